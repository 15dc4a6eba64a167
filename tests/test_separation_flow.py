"""The separation flow end to end: extraction on a local Ray instance (tiny random models), analysis, tables,
figures, report and a real SQLite MLflow store; a base/aligned pair whose layers do not match."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from raysafe.cli import main
from raysafe.config import load_config
from raysafe.errors import ConfigError, OutputError
from raysafe.separation.config import SeparationConfig
from raysafe.separation.flow import run_separation

LANGS = ["en", "ru", "zh"]


def flow_config(tmp, base_dir, aligned_dir, **over) -> SeparationConfig:
    data = {
        "base": {"name": "base", "path": str(base_dir)},
        "aligned": [{"name": "aligned", "path": str(aligned_dir)}],
        "safety": {"kind": "fixture", "name": "safety_prompts", "languages": LANGS},
        "detox": {"kind": "fixture", "name": "detox_pairs", "languages": LANGS, "limit_per_lang": 12},
        "activations_dir": str(tmp / "acts"),
        "output_dir": str(tmp / "out"),
        "options": {
            "k": 4,
            "bootstrap": 20,
            "probe_folds": 3,
            "metrics": ["bhattacharyya", "silhouette_euclidean", "between_var_ratio", "probe_accuracy"],
        },
        "scatter_points_per_class": 20,
        "torch_threads": 1,
        "extract": {"shard_rows": 512, "max_length": 48},
        "ray": {"num_actors": 1, "torch_threads": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "separation-test"},
    }
    data.update(over)
    return load_config(SeparationConfig, data=data)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, ray_local, tiny_llama_dir):
    """One run: base = tiny Llama with 4 layers (layers 0-4), aligned = tiny Llama with 2 layers (layers 0-2)."""
    from raysafe.models.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("separation")
    shallow = save_tiny(tmp / "tiny-llama-2l", "llama", num_layers=2, seed=3)
    cfg = flow_config(tmp, tiny_llama_dir, shallow)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's local artifacts land beside the database
        res = run_separation(cfg, progress=False)
    return tmp, cfg, res


def test_extraction_then_analysis_writes_tables_figures_report(flow_run):
    tmp, cfg, res = flow_run
    assert res.extracted == {"safety": True, "detox": True}
    assert (tmp / "acts" / "safety" / "manifest.json").exists() and (tmp / "acts" / "detox" / "manifest.json").exists()
    assert res.models == ["base", "aligned"] and res.layers == [0, 1, 2, 3, 4] and res.languages == LANGS
    out = tmp / "out"
    for name in ("separation", "best_layers", "shift", "detox"):
        assert (out / "tables" / f"{name}.parquet").exists() and (out / "tables" / f"{name}.csv").exists()
    table = pl.read_parquet(out / "tables" / "separation.parquet")
    assert table.equals(res.table)
    assert pl.read_csv(out / "tables" / "separation.csv").height == table.height

    # The base model has every cell of every layer and language, with values and intervals.
    base = table.filter(pl.col("model") == "base")
    assert set(base["lang"]) == set(LANGS) and sorted(set(base["layer"])) == [0, 1, 2, 3, 4]
    assert base.filter(pl.col("status") == "skipped").height == 0
    bd = base.filter(pl.col("metric") == "bhattacharyya")
    assert bd["value"].is_not_null().all() and (bd["ci_low"] <= bd["ci_high"]).all()
    assert set(bd["n_pos"]) == {60} and set(bd["n_neg"]) == {60}  # 120 items per language, balanced
    probe = base.filter(pl.col("metric") == "probe_accuracy")["value"]
    assert ((probe >= 0) & (probe <= 1)).all()

    # Detox: 12 pairs per language, cosines with the English direction in [-1, 1].
    cos = res.detox.filter((pl.col("model") == "base") & (pl.col("metric") == "detox_cos_en"))
    assert cos.height == 3 * 5 and set(cos["n_pos"]) == {12}
    assert cos["value"].is_not_null().all() and (cos["value"].abs() <= 1 + 1e-9).all()

    figs = {p.name for p in res.figures}
    assert {"curves_base.png", "curves_aligned.png", "shift_heatmap_aligned.png", "detox_curves_base.png"} <= figs
    scatter = sorted(f for f in figs if f.startswith("scatter_"))
    assert len(scatter) == 3 and {f.split("_")[1] for f in scatter} == set(LANGS)  # one per language, one layer
    assert all(p.exists() and p.stat().st_size > 5000 for p in res.figures)
    report = res.report.read_text(encoding="utf-8")
    assert "![curves_base](figures/curves_base.png)" in report
    assert "### Bhattacharyya distance (`bhattacharyya`, unit: nats)" in report and "## Detox displacement" in report


def test_mismatched_layers_are_marked_and_the_rest_completes(flow_run, caplog):
    tmp, cfg, res = flow_run
    t = res.table
    aligned = t.filter(pl.col("model") == "aligned")
    gone = aligned.filter(pl.col("layer") >= 3)
    assert gone.height > 0 and (gone["status"] == "skipped").all() and gone["value"].is_null().all()
    msg = gone.filter((pl.col("layer") == 3) & (pl.col("lang") == "ru"))["message"][0]
    assert "model 'aligned'" in msg and "layer 3" in msg and "'ru'" in msg
    kept = aligned.filter((pl.col("layer") <= 2) & (pl.col("metric") == "bhattacharyya"))
    assert kept.height == 3 * 3 and kept["value"].is_not_null().all()

    shift = res.shift.filter(pl.col("metric") == "bhattacharyya")
    assert (shift.filter(pl.col("layer") >= 3)["status"] == "skipped").all()
    ok = shift.filter(pl.col("layer") <= 2)
    assert ok["shift"].is_not_null().all()
    first = ok.row(0, named=True)
    assert first["shift"] == pytest.approx(first["aligned_value"] - first["base_value"])
    en = ok.filter(pl.col("lang") == "en")
    assert (en["shift_diff_en"].abs() < 1e-12).all()

    report = res.report.read_text(encoding="utf-8")
    assert "## Skipped and degraded cells" in report and "aligned, ru, layer 3: skipped" in report
    assert "skipped" in res.summary()


def test_mlflow_run_holds_metrics_per_layer_and_artifacts(flow_run):
    import mlflow

    tmp, cfg, res = flow_run
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raysafe.flow"] == "separation"
    assert run.data.tags["raysafe.extract_run.safety"]  # the extraction's own run is linked
    # the activations it read are its dataset inputs, each with the identity of what it holds
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f"{k} activations of {m}" for k in ("safety", "detox") for m in ("base", "aligned")}
    assert inputs["safety activations of base"].digest == res.activations["safety"]["models"]["base"]["activations"]
    hist = mlflow.MlflowClient().get_metric_history(res.mlflow_run_id, "bhattacharyya.base.en")
    assert sorted(m.step for m in hist) == [0, 1, 2, 3, 4]
    assert "shift.bhattacharyya.aligned.ru" in run.data.metrics and "best.probe_accuracy.base.zh" in run.data.metrics
    assert run.data.metrics["cells_skipped"] > 0
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id)}
    assert {"tables", "figures", "separation_report.md", "config.yaml"} <= arts
    tables = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id, "tables")}
    assert "tables/separation.parquet" in tables and "tables/shift.csv" in tables


def test_cli_rerun_reuses_the_activations(flow_run, capsys, monkeypatch):
    import mlflow

    tmp, cfg, res = flow_run
    monkeypatch.chdir(tmp)
    path = tmp / "again.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {"output_dir": str(tmp / "again")}), encoding="utf-8")
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    exp = mlflow.get_experiment_by_name("separation-test").experiment_id
    before = len(mlflow.search_runs([exp]))
    assert main(["-q", "separation", str(path), "--set", "options.bootstrap=0", "--set", "detox=null"]) == 0
    text = capsys.readouterr().out
    assert "reused from the store" in text and "base — best value per metric" in text
    assert len(mlflow.search_runs([exp])) == before + 1  # no extraction run this time
    again = pl.read_parquet(tmp / "again" / "tables" / "separation.parquet")
    assert again.filter(pl.col("ci_low").is_not_null() & (pl.col("metric") != "probe_accuracy")).height == 0
    assert not (tmp / "again" / "tables" / "detox.parquet").exists()
    key = ["model", "lang", "layer", "metric"]
    a = again.select(*key, "value").sort(key)
    b = res.table.select(*key, "value").sort(key)
    assert a["value"].fill_null(-1).to_list() == pytest.approx(b["value"].fill_null(-1).to_list(), abs=1e-9)


def test_missing_activations_without_extraction_say_where_and_what_to_do(tmp_path):
    cfg = load_config(
        SeparationConfig,
        data={
            "base": {"path": "no-such-org/no-such-model"},
            "activations_dir": str(tmp_path / "acts"),
            "output_dir": str(tmp_path / "out"),
            "extract_if_missing": False,
            "tracking": {"enabled": False},
        },
    )
    with pytest.raises(OutputError) as e:
        run_separation(cfg, progress=False)
    assert "safety activations are incomplete" in e.value.what and str(tmp_path / "acts" / "safety") in e.value.where
    assert "raysafe extract" in e.value.fix


@pytest.mark.parametrize(
    "data, match",
    [
        ({"base": {"path": "a"}, "position": "mean"}, "position 'mean' is not extracted"),
        ({"base": {"path": "a", "name": "m"}, "aligned": [{"path": "b", "name": "m"}]}, r"\['m'\] repeats"),
        ({"aligned": [{"path": "b"}]}, "give the base model"),
        ({"base": {"path": "a"}, "pairs": [{"base": {"path": "b"}}]}, "not both"),
        ({"base": {"path": "a"}, "layers": [1, 30], "extract": {"layers": [1, 2]}}, r"layers \[30\] are analysed"),
    ],
)
def test_config_errors_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SeparationConfig, data=data)


def test_sources_without_group_id_are_numbered_per_language(tmp_path):
    """The textdetox sets (cluster config) have no id column: rows get <lang>-<i>, so detox pairs stay paired."""
    from raysafe.config import SourceSpec
    from raysafe.data.schemas import PARALLEL_DETOX
    from raysafe.data.sources import load_table, to_text_rows

    pl.DataFrame(
        {"toxic_sentence": ["you idiot", "shut up"], "neutral_sentence": ["you are wrong", "please stop"]}
    ).write_parquet(tmp_path / "de.parquet")
    spec = SourceSpec(
        kind="file",
        path=str(tmp_path / "de.parquet"),
        lang="de",
        contract="parallel_detox",
        columns={"toxic_sentence": "toxic", "neutral_sentence": "neutral"},
    )
    rows = to_text_rows(load_table(spec, PARALLEL_DETOX), PARALLEL_DETOX.name)
    assert rows.select("group_id", "label").rows() == [("de-0", 1), ("de-0", 0), ("de-1", 1), ("de-1", 0)]
