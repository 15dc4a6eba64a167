"""`raysafe study` end to end on a tiny random model: every stage as a child run of one MLflow parent run, the
before/after report, and continuing after an interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import yaml

from raysafe.config import load_config
from raysafe.errors import ConfigError
from raysafe.study.config import StudyConfig
from raysafe.study.flow import plan, run_study

pytestmark = pytest.mark.slow
LANGS = ["en", "zh", "ru", "ar"]


def study_tree(model_dir, out) -> dict:
    return {
        "model": {"path": str(model_dir), "name": "tiny"},
        "output_dir": str(out),
        "skip": ["concepts"],
        "train": {
            "data": {"max_length": 96, "max_prompt_length": 64},
            "mixture": {"languages": LANGS, "m": 4},
            "mlc": {"weight": 0.8, "layer": 2, "d": 16, "every_k": 1},
            "optim": {"lr": 1e-3, "epochs": 1, "micro_batch": 2, "grad_accum": 1, "warmup_ratio": 0.0, "max_steps": 2},
            "deepspeed": {"zero_stage": 0},
            "checkpoint": {"every_n_steps": 2},
            "ray": {"num_workers": 1, "torch_threads": 1},
        },
        "separation": {
            "safety": {"kind": "fixture", "name": "safety_prompts", "languages": LANGS},
            "detox": None,
            "layers": [1, 2, 3],
            "options": {"k": 4, "bootstrap": 0, "probe_folds": 3},
            "extract": {"layers": [1, 2, 3], "positions": ["last"], "max_length": 64},
        },
        "evaluate": {
            "sets": [
                {
                    "name": "sp",
                    "split": "test",
                    "harmful_only": True,
                    "sources": [{"kind": "fixture", "name": "safety_prompts", "languages": LANGS}],
                }
            ],
            "generation": {"max_new_tokens": 4, "batch_size": 12, "shard_rows": 48},
            "utility": {"enabled": False},
            "metrics": {"bootstrap": 100},
        },
        "consistency_split": None,
        "ray": {"num_actors": 1, "torch_threads": 1},
        "tracking": {"experiment": "test-study"},
    }


@pytest.mark.heavy
def test_study_interrupted_then_continued_under_one_parent_run(ray_local, tiny_llama_dir, tmp_path, monkeypatch):
    """Start `raysafe study` in a subprocess, kill it once the base model's stages are done, run it again: the
    finished stages are reused, the rest runs, every stage is a child of the same MLflow parent run, and the
    before/after report is complete."""
    from mlflow import MlflowClient

    out = tmp_path / "study"
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(study_tree(tiny_llama_dir, out)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysafe.cli", "-q", "study", str(cfg_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = out / "stages" / "evaluate_before.json"
    deadline = time.time() + 400
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.5)
    assert marker.exists(), "the first stages never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # interrupt: the driver and everything it started
    proc.wait()
    done_before = {p.stem for p in (out / "stages").glob("*.json")} - {"mlflow_parent_run"}
    assert {"separation_before", "evaluate_before"} <= done_before and "report" not in done_before

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(StudyConfig, cfg_path, [])
    res = run_study(cfg, progress=False)

    assert set(res.reused) == done_before
    assert (
        list(res.stages)
        == plan(cfg)
        == [
            "separation_before",
            "evaluate_before",
            "train_mlc",
            "separation_after",
            "evaluate_after",
            "consistency",
            "report",
        ]
    )
    table = res.table
    assert set(table["model"].to_list()) == {"tiny", "tiny-mlc"}
    assert set(table["lang"].to_list()) == set(LANGS)
    trained = table.filter(pl.col("model") == "tiny-mlc")
    assert trained["safety_change"].is_not_null().all()
    assert trained["shift_probe_accuracy"].is_not_null().all()
    per_model = pl.read_parquet(res.report.parent / "per_model.parquet")
    assert per_model.filter(pl.col("model") == "tiny-mlc")["head_bias_share"].is_not_null().all()  # head monitor
    diffs = pl.read_parquet(res.stages["consistency"]["differences"])  # held-out, paired, at the MLC layer
    assert set(diffs["comparison"]) == {"mlc − base"} and set(diffs["lang"]) == set(LANGS) - {"en"} | {"all"}
    report = res.report.read_text()
    assert "## Headline: MLC against its control" in report and "**retrieval_p1**" in report
    assert "## Per language" in report and "safety_before_after.png" in report
    assert (res.report.parent / "safety_before_after.png").stat().st_size > 0

    client = MlflowClient(uri)
    exp = client.get_run(res.mlflow_run_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    flows = sorted(c.data.tags.get("raysafe.flow", "?") for c in children)
    assert flows.count("separation") == 2 and flows.count("evaluate") == 2 and "train" in flows, flows
    assert any(a.path == "report" for a in client.list_artifacts(res.mlflow_run_id))
    assert len(client.search_runs([exp], filter_string="tags.`raysafe.flow` = 'study'")) == 1

    # a third run reuses every stage
    again = run_study(cfg, progress=False)
    assert again.reused == list(again.stages) and again.mlflow_run_id == res.mlflow_run_id
    # a changed setting reruns the stages it concerns (and the report), nothing else
    changed = load_config(StudyConfig, cfg_path, ["evaluate.metrics.bootstrap=50"])
    third = run_study(changed, progress=False)
    assert set(third.stages) - set(third.reused) == {"evaluate_before", "evaluate_after", "report"}


def test_stage_config_errors_surface_at_load_time_with_the_stage_named(tiny_llama_dir, tmp_path):
    tree = study_tree(tiny_llama_dir, tmp_path / "s")
    tree["train"]["optim"]["lr"] = -1
    with pytest.raises(ConfigError, match=r"train\.optim\.lr"):
        load_config(StudyConfig, data=tree)
    tree = study_tree(tiny_llama_dir, tmp_path / "s")
    tree["force"] = ["training"]
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(StudyConfig, data=tree)


def test_stage_identity_names_data_weights_and_settings_and_decides_reuse(tiny_llama_dir, tmp_path):
    """A stage is reused only on an identical identity; what changed is named; a changed training stage and a
    forced stage are rerun with restart (their old outputs moved aside by their flow)."""
    import json

    from raysafe.config import ModelSpec
    from raysafe.study.flow import _Stages, stage_identity

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"group_id": "g1", "lang": "en", "text": "hi"}) + "\n")
    base = ModelSpec(path=str(tiny_llama_dir), name="tiny")
    settings = {
        "sets": [{"sources": [{"kind": "file", "path": str(prompts)}]}],
        "utility": {"sources": [{"kind": "fixture", "name": "mc_questions"}]},  # a fixture of the evaluate flow's own
        "metrics": {"bootstrap": 100},
    }
    first = stage_identity(settings, [base])
    assert first["weights: tiny"] and first["data: sets.0.sources.0"] and first["metrics.bootstrap"] == 100
    assert first["data: utility.sources.0"]

    cfg = load_config(StudyConfig, data=study_tree(tiny_llama_dir, tmp_path / "s"))
    calls: list[tuple[str, bool]] = []

    def stage(name):
        return lambda restart: calls.append((name, restart)) or {"done": name}

    st = _Stages(cfg, plan(cfg), None)
    st.run("evaluate_before", stage("evaluate_before"), first)
    st.run("evaluate_before", stage("evaluate_before"), first)
    assert calls == [("evaluate_before", False)] and st.result.reused == ["evaluate_before"]

    prompts.write_text(json.dumps({"group_id": "g1", "lang": "en", "text": "hello"}) + "\n")  # same name, new rows
    st.run("evaluate_before", stage("evaluate_before"), stage_identity(settings, [base]))
    assert calls[-1] == ("evaluate_before", False)
    assert [c.rsplit(": ", 1)[0] for c in st.result.changed["evaluate_before"]] == ["data: sets.0.sources.0"]

    st.run("train_mlc", stage("train_mlc"), {"optim.lr": 1e-3})
    st.run("train_mlc", stage("train_mlc"), {"optim.lr": 2e-3})
    assert calls[-2:] == [("train_mlc", False), ("train_mlc", True)]
    assert st.result.changed["train_mlc"] == ["optim.lr: 0.001 → 0.002"]

    forced = _Stages(cfg.model_copy(update={"force": ["train"]}), plan(cfg), None)
    forced.run("train_mlc", stage("train_mlc"), {"optim.lr": 2e-3})
    assert calls[-1] == ("train_mlc", True)
