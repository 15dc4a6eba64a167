"""`raysafe translate` end to end on a real local Ray instance, tiny random MT models and a real SQLite MLflow store:
valid contract files, flags counted per language and excluded (never dropped), pairs keeping their structure and
ids, identity refusals, re-flagging without re-translating, and resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from raysafe.config import SourceSpec, load_config
from raysafe.data import schemas
from raysafe.data.sources import load_table
from raysafe.errors import OutputError
from raysafe.translate.config import TranslateConfig
from raysafe.translate.flow import run_translate
from raysafe.translate.store import TranslationStore

pytestmark = pytest.mark.slow

LENIENT = {"min_chrf": 0.0, "min_length_ratio": 0.0, "max_length_ratio": 1000.0}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance whose workers can import tests/translate_fakes.py (the fake language identifiers named in
    quality.langid): Ray workers inherit the environment of the process that starts Ray, not the driver's sys.path."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, old) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_m2m(tmp_path_factory):
    from raysafe.models.tiny import save_tiny_mt

    return save_tiny_mt(tmp_path_factory.mktemp("mt") / "m2m", "m2m100", ["__en__", "__zh__", "__ru__", "__ja__"])


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    from raysafe.models.tiny import save_tiny_mt

    return save_tiny_mt(tmp_path_factory.mktemp("mt") / "marian", "marian", [">>zho<<", ">>rus<<", ">>eng<<"])


def config(out, model, data, targets, quality=None, tracking=False, **translate):
    return load_config(
        TranslateConfig,
        data={
            "data": data,
            "translator": {"kind": "seq2seq", "model": {"path": str(model), "name": "tiny"}, "max_new_tokens": 6},
            "translate": {"target_langs": targets, "shard_rows": 4, **translate},
            "quality": quality or {},
            "output_dir": str(out),
            "ray": {"torch_threads": 1},
            "tracking": {"enabled": tracking},
        },
    )


def test_variants_valid_flags_counted_reflag_without_translating_and_identity(
    tmp_path, tiny_m2m, tiny_marian, ray_local, mlflow_local
):
    data = {"kind": "fixture", "name": "safety_prompts", "languages": ["en", "zh"], "limit_per_lang": 6}
    quality = {"langid": "translate_fakes:says_zh", **LENIENT}
    res = run_translate(config(tmp_path / "out", tiny_m2m, data, ["zh", "ru"], quality, tracking=True), False)
    assert res.cells_total == 4 and res.cells_translated == 4
    # the file is a valid PROMPT_VARIANTS table: the English sources and their zh translations, ids shared
    variants = load_table(SourceSpec(kind="file", path=str(res.files["variants"])), schemas.PROMPT_VARIANTS)
    en = variants.filter(pl.col("lang") == "en")
    assert en.height == 6 and set(variants["lang"]) == {"en", "zh"}  # ru was flagged: excluded by default
    assert sorted(variants.filter(pl.col("lang") == "zh")["group_id"]) == sorted(en["group_id"])
    assert variants.filter(pl.col("lang") == "zh")["label"].to_list() == en["label"].to_list()
    raw = pl.read_parquet(res.files["variants"])
    assert {"langid_prob", "chrf_round_trip", "length_ratio", "flagged"} <= set(raw.columns)
    # ... never silently dropped: kept in translations.parquet with the reason, counted per language
    tr = pl.read_parquet(res.files["translations"])
    assert tr.filter(pl.col("lang") == "ru")["flag_reasons"].unique().to_list() == ["langid"]
    rep = {r["lang"]: r for r in res.report.iter_rows(named=True)}
    assert (rep["ru"]["flagged"], rep["ru"]["kept"], rep["ru"]["flag_langid"]) == (6, 0, 6)
    assert (rep["zh"]["flagged"], rep["zh"]["kept"]) == (0, 6)
    assert (tmp_path / "out" / "figures" / "quality_chrf_round_trip.png").is_file()

    from mlflow import MlflowClient

    run = MlflowClient().get_run(res.mlflow_run_id)
    assert run.data.metrics["flagged_ru"] == 6 and run.data.metrics["kept_zh"] == 6
    assert run.data.metrics["progress_zh"] == 1.0
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == res.dataset_fingerprint and inp.dataset.name == "prompt_variants-en"
    arts = {a.path for a in MlflowClient().list_artifacts(res.mlflow_run_id, "figures")}
    assert "figures/quality_langid_prob.png" in arts

    # a threshold change re-flags from the stored scores: only the added language is translated
    quality2 = {**quality, "exclude_flagged": False}
    again = run_translate(config(tmp_path / "out", tiny_m2m, data, ["zh", "ru", "ja"], quality2), False)
    assert (again.cells_total, again.cells_translated) == (6, 2)
    kept = pl.read_parquet(again.files["variants"])
    assert kept.filter(pl.col("lang") == "ru")["flagged"].to_list() == [True] * 6
    assert kept.filter(pl.col("lang") == "ja")["flag_reasons"].to_list() == ["langid"] * 6

    # another model, or another scorer, into the same directory: refused with the differing fields named
    with pytest.raises(OutputError, match=r"made differently \(translator: ") as e:
        run_translate(config(tmp_path / "out", tiny_marian, data, ["zh", "ru"], quality), False)
    assert "translation.json" in e.value.where
    with pytest.raises(OutputError, match="scoring: "):
        run_translate(config(tmp_path / "out", tiny_m2m, data, ["zh", "ru"], {**quality, "round_trip": False}), False)
    data2 = {**data, "limit_per_lang": 5}
    with pytest.raises(OutputError, match="dataset_fingerprint: "):
        run_translate(config(tmp_path / "out", tiny_m2m, data2, ["zh", "ru"], quality), False)


def test_pairs_keep_structure_and_ids(tmp_path, tiny_marian, ray_local):
    data = {"kind": "fixture", "name": "preference_pairs", "limit_per_lang": 5}
    quality = {"langid": "translate_fakes:zh_then_tagalog", "round_trip": False, **LENIENT}
    res = run_translate(config(tmp_path / "pairs", tiny_marian, data, ["zh"], quality), False)
    assert res.contract == "preference_pairs"
    tr = pl.read_parquet(res.files["translations"])
    src = load_table(SourceSpec(kind="fixture", name="preference_pairs", limit_per_lang=5), schemas.PREFERENCE_PAIRS)
    # each field translated on its own, from its own source text
    for field in ("prompt", "chosen", "rejected"):
        assert tr.filter(pl.col("field") == field).sort("row_id")["source_text"].to_list() == src[field].to_list()
    assert tr["back_text"].null_count() == tr.height  # round trip off
    # odd positions are identified as Tagalog in every field: pairs 1 and 3 are flagged and left out; a pair whose
    # two answers came out the same (a random model often writes one string) is flagged and left out too
    answers = tr.filter(pl.col("field").is_in(["chosen", "rejected"])).pivot(on="field", index="row_id", values="text")
    same = {r for r, c, x in answers.select("row_id", "chosen", "rejected").iter_rows() if c.strip() == x.strip()}
    pairs = load_table(SourceSpec(kind="file", path=str(res.files["pairs"])), schemas.PREFERENCE_PAIRS)
    zh = pairs.filter(pl.col("lang") == "zh")
    assert zh["group_id"].to_list() == [src["group_id"][i] for i in (0, 2, 4) if i not in same]
    flagged = pl.read_parquet(res.files["translations"]).filter(pl.col("flagged"))
    assert sorted(set(flagged["row_id"])) == sorted({1, 3} | same)
    reasons = flagged.filter((pl.col("field") == "rejected") & pl.col("row_id").is_in(list(same - {1, 3})))
    assert all("same_as_chosen" in r for r in reasons["flag_reasons"])
    assert res.report.row(0, named=True)["flagged"] == len({1, 3} | same)
    variants = load_table(SourceSpec(kind="file", path=str(res.files["variants"])), schemas.PROMPT_VARIANTS)
    assert variants.filter(pl.col("lang") == "zh").height == 3  # the prompts themselves are not flagged by it


def test_an_error_in_an_actor_reaches_the_user_as_itself(tmp_path, tiny_m2m, ray_local):
    from raysafe.errors import DataError

    data = {"kind": "fixture", "name": "safety_prompts", "languages": ["en"], "limit_per_lang": 3}
    cfg = config(tmp_path / "long", tiny_m2m, data, ["zh"], {"langid": "off"})
    cfg.translator.max_input_tokens = 10
    with pytest.raises(DataError, match="over translator.max_input_tokens=10") as e:
        run_translate(cfg, False)
    assert "group_id 'harm-001', field 'text', en -> zh" in e.value.where
    assert "Traceback" not in str(e.value)


KILL_SCRIPT = """
import sys
from raysafe.config import load_config
from raysafe.translate.config import TranslateConfig
from raysafe.translate.flow import run_translate
run_translate(load_config(TranslateConfig, sys.argv[1]), progress=False)
"""


def test_killed_translation_resumes_only_missing_cells(tmp_path, tiny_m2m):
    import yaml

    def cfg_file(out):
        p = tmp_path / f"{out}.yaml"
        p.write_text(
            yaml.safe_dump(
                {
                    "data": {"kind": "fixture", "name": "safety_prompts", "languages": ["en"], "limit_per_lang": 40},
                    "translator": {"kind": "seq2seq", "model": {"path": str(tiny_m2m)}, "max_new_tokens": 4},
                    "translate": {"target_langs": ["zh", "ru"], "shard_rows": 1},
                    "quality": {"langid": "off"},
                    "output_dir": str(tmp_path / out),
                    "ray": {"torch_threads": 1},
                    "tracking": {"enabled": False},
                }
            )
        )
        return p

    killed = cfg_file("killed")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(killed)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    store = TranslationStore(tmp_path / "killed")

    def done():
        return {(lang, k) for lang in ("zh", "ru") for k in store.done_shards(lang)}

    deadline = time.time() + 300
    while time.time() < deadline and len(done()) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # workers of the killed driver may finish the cell in hand: wait until nothing new lands for 3 s
    before, still = done(), time.time()
    while time.time() - still < 3 and time.time() < deadline + 60:
        time.sleep(0.2)
        if done() != before:
            before, still = done(), time.time()
    assert 5 <= len(before) < 80, f"kill landed at {len(before)} cells; the test needs a partial run"
    mtimes = {c: store.done_path(*c).stat().st_mtime_ns for c in before}

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res = run_translate(load_config(TranslateConfig, killed), progress=False)
    assert res.cells_translated == 80 - len(before)
    assert {c: store.done_path(*c).stat().st_mtime_ns for c in before} == mtimes
    variants = load_table(SourceSpec(kind="file", path=str(res.files["variants"])), schemas.PROMPT_VARIANTS)
    assert variants.height >= 40
    # a write the kill interrupted may leave its temporary file: a dot-name no reader globs, never a cell
    for f in (tmp_path / "killed").rglob("*shard-*"):
        assert f.name.startswith("shard-") or f.name.startswith(".shard-")
    assert all(store.shard_path(*c).is_file() for c in [(lang, k) for lang in ("zh", "ru") for k in range(40)])
