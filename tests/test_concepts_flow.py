"""The value-concept flow end to end: a tiny random model, the bundled concept pairs, a real local Ray instance
for the extraction and a real SQLite MLflow store; bad inputs are reported and the rest completes."""

from __future__ import annotations

import json

import polars as pl
import pytest

from raysafe.concepts.config import ConceptsConfig
from raysafe.concepts.flow import ensure_activations, run_concepts
from raysafe.config import load_config
from raysafe.data.sources import fixture_path
from raysafe.errors import ConfigError

LANGS = ["en", "de", "sw", "bn"]
CONCEPTS = ["fairness", "morality", "toxicity"]


@pytest.fixture()
def pairs_file(tmp_path):
    """The bundled pairs of three concepts in four languages, with fairness/bn cut to 3 pairs (too few for
    min_pairs 4)."""
    rows = [json.loads(line) for line in fixture_path("concept_pairs").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["lang"] in LANGS and r["concept"] in CONCEPTS]
    short = [r for r in rows if r["concept"] == "fairness" and r["lang"] == "bn"]
    drop = {id(r) for r in short[3:]}
    rows = [r for r in rows if id(r) not in drop]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def make_config(model_dir, pairs, tmp_path, **over) -> ConceptsConfig:
    data = {
        "models": [{"path": str(model_dir), "name": "tiny"}],
        "data": {"kind": "file", "path": str(pairs)},
        "activations_dir": str(tmp_path / "acts"),
        "output_dir": str(tmp_path / "concepts"),
        "layers": [0, 2, 3, 9],  # the tiny model has 4 decoder layers: 9 is out of range
        "extract": {"shard_rows": 512, "max_length": 64},
        "analysis": {
            "min_pairs": 4,
            "selection_folds": 3,
            "distance_types": ["genetic", "syntactic"],
            "iso3_overrides": {"sw": "qqq"},  # a code URIEL does not know
            "high_resource": ["en", "de"],
        },
        "steering": {
            "concepts": ["toxicity"],
            "alphas": [-2.0, 0.0, 2.0],
            "layers": [2, [2, 3], 7],
            "n_pairs": 3,
            "n_neutral": 3,
            "batch_size": 8,
            "max_length": 48,
            "torch_threads": 1,
            "generate": {"enabled": True, "concepts": ["toxicity"], "n_prompts": 2, "max_new_tokens": 3},
        },
        "ray": {"num_actors": 1, "torch_threads": 1},
        **over,
    }
    return load_config(ConceptsConfig, data=data)


@pytest.mark.slow
def test_end_to_end_with_bad_inputs_reported(ray_local, mlflow_local, tiny_llama_dir, pairs_file, tmp_path):
    import mlflow

    cfg = make_config(tiny_llama_dir, pairs_file, tmp_path)
    res = run_concepts(cfg, progress=False)
    assert res.extracted == {"tiny": True}
    m = res.models["tiny"]
    print(res.summary())
    assert m.error is None and m.layers == [0, 2, 3]
    root = tmp_path / "concepts" / "tiny"

    # tables, Parquet and CSV
    t = {p.stem: pl.read_parquet(p) for p in (root / "tables").glob("*.parquet")}
    for name in (
        "recognition",
        "recognition_best",
        "consistency_summary",
        "transfer_best",
        "transfer_max",
        "transfer_asymmetry",
        "language_distance",
        "distance_correlation",
        "vectors",
        "status",
        "steering",
        "steering_judged",
        "steering_generations",
    ):
        assert name in t, name
        assert (root / "tables" / f"{name}.csv").exists(), name
    assert set(t["recognition"]["lang"]) == set(LANGS)
    assert set(t["recognition"]["layer"]) == {0, 2, 3}
    assert t["recognition"]["test_acc"].is_between(0, 1).all()
    diag = t["transfer_best"].filter(pl.col("source_lang") == pl.col("target_lang"))
    assert diag.height and (diag["delta"] == 0).all()

    # bad inputs: each named in the status table, and the rest of the analysis completed
    status = t["status"]
    msgs = "\n".join(status["message"])
    assert "layer 9 is out of range (0..4)" in msgs
    assert "concept 'fairness' in language 'bn' has too few pairs (train 3, test 0" in msgs
    assert "URIEL has no" in msgs and "'sw'" in msgs
    assert "steering layer(s) [7] out of range" in msgs
    assert "no neutral text in language 'de'" in msgs
    assert set(t["recognition"].filter(pl.col("concept") == "fairness")["lang"]) == {"en", "de", "sw"}
    assert set(t["recognition"].filter(pl.col("concept") == "morality")["lang"]) == set(LANGS)
    dist_langs = set(t["language_distance"]["lang_a"]) | set(t["language_distance"]["lang_b"])
    assert dist_langs == {"en", "de", "bn"}

    # steering: every target language x alpha for the two valid layer sets; alpha 0 is the baseline
    steer = t["steering"]
    assert set(steer["layers"]) == {"2", "2,3"} and set(steer["lang"]) == set(LANGS)
    assert steer.height == 2 * len(LANGS) * 3
    base = steer.filter(pl.col("alpha") == 0)
    assert (base["projection_shift"] == 0).all() and (base["behaviour_shift"] == 0).all()
    moved = steer.filter(pl.col("alpha") != 0)
    assert (moved["projection_shift"].abs() > 0).all()
    assert steer.filter(pl.col("lang") == "de")["perplexity"].is_nan().all()
    assert steer.filter(pl.col("lang") == "en")["perplexity"].is_finite().all()
    judged = t["steering_judged"]
    assert judged.height == 2 * len(LANGS) * 3 and judged["n_generated"].min() == 2
    assert t["steering_generations"].height == 2 * len(LANGS) * 3 * 2

    # figures and report
    figs = {p.name for p in (root / "figures").glob("*.png")}
    assert {
        "recognition_toxicity.png",
        "similarity_mean.png",
        "consistency_curve.png",
        "transfer_mean.png",
        "similarity_vs_genetic_mean.png",
        "steering_toxicity_layers_2.png",
        "steering_toxicity_layers_2_3.png",
        "steering_judged_toxicity_layers_2.png",
    } <= figs
    report = (root / "report.md").read_text()
    assert "## Cross-lingual control (steering)" in report and "layer 9 is out of range" in report
    index = res.report.read_text()
    assert "[full report](tiny/report.md)" in index
    summary = pl.read_parquet(tmp_path / "concepts" / "summary.parquet")
    assert "consistency.mean_max_cosine" in set(summary["metric"])

    # MLflow: one run with the findings and the artifacts
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.tags["raysafe.flow"] == "concepts"
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"concept pairs", "neutral prompts (steering)", "concept pairs activations of tiny"}
    assert inputs["concept pairs activations of tiny"].digest == res.activations["tiny"]["activations"]
    assert 0 <= run.data.metrics["tiny.recognition.test_acc_mean"] <= 1
    assert "tiny.transfer.high_minus_low" in run.data.metrics
    assert any(k.startswith("tiny.steering.toxicity.L2.sw.alpha2") for k in run.data.metrics)
    arts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="concepts/tiny")}
    assert {"concepts/tiny/report.md", "concepts/tiny/tables", "concepts/tiny/figures"} <= arts
    assert "concepts/report.md" in {
        a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="concepts")
    }
    assert "layers analysed" in res.summary() and "recognition" in res.summary()

    # The analysis names the activations it was computed from (weights and texts fingerprints) beside its outputs.
    from raysafe.models.loading import resolve

    ident = json.loads((root / "activations.json").read_text())["models"]["tiny"]
    assert ident["weights"] == resolve(cfg.models[0]).fingerprint == res.activations["tiny"]["weights"]
    index = json.loads((tmp_path / "concepts" / "activations.json").read_text())
    assert (
        index["models"]["tiny"] == ident and index["identity"] == res.identity == run.data.params["analysis_identity"]
    )
    assert run.data.params["acts.tiny.weights"] == ident["weights"]
    assert run.data.params["acts.tiny.activations"] == ident["activations"]

    # A second run finds the activation store complete and current: nothing is extracted and Ray is not needed.
    wanted = [0, 2, 3, 9]
    again = ensure_activations(cfg, [(cfg.models[0], 4, wanted, [0, 2, 3])], progress=False)
    assert again["tiny"].extracted == [] and again["tiny"].identities["tiny"] == ident
    # Another position extends the store in place: the model is extracted again with both positions.
    more = ensure_activations(
        cfg.model_copy(update={"position": "mean"}), [(cfg.models[0], 4, wanted, [0, 2, 3])], progress=False
    )
    assert more["tiny"].extracted == ["tiny"] and more["tiny"].identities["tiny"]["positions"] == ["last", "mean"]
    assert more["tiny"].identities["tiny"]["weights"] == ident["weights"]


def test_config_errors_name_the_field(tmp_path):
    base = {"models": [{"path": "gemma3-270m"}]}
    with pytest.raises(ConfigError, match="top-level `layers`"):
        load_config(ConceptsConfig, data={**base, "extract": {"layers": [1, 2]}})
    with pytest.raises(ConfigError, match="holds none"):
        load_config(ConceptsConfig, data={**base, "data": {"kind": "fixture", "name": "safety_prompts"}})
    with pytest.raises(ConfigError, match="steering.alphas"):
        load_config(ConceptsConfig, data={**base, "steering": {"alphas": []}})
    with pytest.raises(ConfigError, match="unique"):
        load_config(ConceptsConfig, data={"models": [{"path": "a/x"}, {"path": "b/x"}]})


def test_no_valid_layer_is_a_config_error_before_any_work(tiny_llama_dir, pairs_file, tmp_path):
    cfg = make_config(tiny_llama_dir, pairs_file, tmp_path, layers=[7, 9])
    with pytest.raises(ConfigError, match="none of the layers") as err:
        run_concepts(cfg, progress=False)
    assert "0..4" in str(err.value)
    assert not (tmp_path / "acts").exists()


@pytest.mark.parametrize("name", ["concepts_local", "concepts_cluster"])
def test_job_configs_validate(name):
    from pathlib import Path

    # the cluster config's data lives on the cluster's shared storage: its existence is not checked here
    cfg = load_config(
        ConceptsConfig, Path(__file__).parents[1] / "jobs" / "configs" / f"{name}.yaml", check_paths=False
    )
    assert cfg.models and cfg.steering.source_lang == "en"
