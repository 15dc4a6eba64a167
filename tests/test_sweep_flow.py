"""The sweep flow end to end on a real local Ray (Tune trials running Ray Train workers, the evaluation flow, a real
SQLite MLflow store) on a tiny random Llama: the sweep is killed after its first trial and resumed; ASHA, with the
rung it recorded before the kill, stops the lagging second trial; then tracking, Pareto figure and best config.

One test on purpose: every trial costs a few process starts (trial driver, Train worker, evaluation actor), so the
kill/resume, ASHA and tracking checks share the same two trials (the slow-test budget of CI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raysafe.config import load_config
from raysafe.sweep.config import SweepConfig
from raysafe.sweep.flow import run_sweep
from raysafe.sweep.objective import score
from raysafe.train.config import TrainConfig

pytestmark = pytest.mark.slow


def sweep_tree(model_dir, tmp_path) -> dict:
    return {
        "name": "e2e",
        "output_dir": str(tmp_path / "sweeps"),
        "train": {
            "model": {"path": str(model_dir), "name": "tiny"},
            "precompute_reference": "off",  # the reference on the worker: one process start less per trial
            "data": {
                "max_length": 128,
                "max_prompt_length": 96,
                "pairs": {"kind": "fixture", "name": "preference_pairs", "limit_per_lang": 2},
            },
            "mixture": {"languages": ["en", "zh", "ru"], "m": 2},
            "mlc": {"weight": 0.8, "layer": 2, "d": 16, "every_k": 1},
            # 2 pairs = one optimiser step per epoch: every step sees the same batch, so a learning trial's loss falls
            "optim": {
                "lr": 2e-3,
                "epochs": 3,
                "micro_batch": 2,
                "grad_accum": 1,
                "warmup_ratio": 0.0,
                "schedule": "constant",
                "max_steps": 3,
            },
            "deepspeed": {"zero_stage": 1},
            "checkpoint": {"storage_path": str(tmp_path / "base-train"), "keep": 1},
            "ray": {"num_workers": 1, "torch_threads": 1},
            "tracking": {"experiment": "test-sweep-train"},
        },
        # one at a time, in this order: A learns; B (lr ~ 0) lags A at the ASHA rung (step 2)
        "space": {"lr": [2e-3, 1e-9]},
        "search": {"max_concurrent_trials": 1},
        "scheduler": {
            "kind": "asha",
            "metric": "train_loss_align",
            "mode": "min",
            "grace_period": 2,
            "reduction_factor": 2,
            "report_every_n_steps": 1,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "evaluation": {
            "evaluate": {
                "sets": [
                    {
                        "name": "sp",
                        "split": "test",
                        "sources": [{"kind": "fixture", "name": "safety_prompts"}],
                        "references": {"kind": "fixture", "name": "preference_pairs"},
                    }
                ],
                "languages": ["en", "zh"],
                "generation": {"max_new_tokens": 4, "batch_size": 24, "shard_rows": 24},
                "utility": {"batch_size": 32},
                "metrics": {"bootstrap": 50},
                "ray": {"num_actors": 1, "num_cpus_per_actor": 1, "torch_threads": 1},
            },
            "consistency": {"enabled": False},
        },  # the held-out measure has its own test (test_sweep_space.py)
        "objective": {
            "primary": {"metric": "train_align_rewards_margins", "mode": "max"},
            "terms": [{"metric": "utility_drop", "mode": "min", "weight": 0.5}],
            "constraints": [{"metric": "utility_drop", "max": 1.0}],
            "pareto": [
                {"metric": "train_align_rewards_margins", "mode": "max"},
                {"metric": "utility_drop", "mode": "min"},
                {"metric": "safety_mean", "mode": "max"},
            ],
        },
        "tracking": {"experiment": "test-sweep"},
    }


def _trial_statuses(exp_dir: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    if not any(exp_dir.glob("experiment_state-*.json")):
        return {}
    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_dir)).trials}
    except (ValueError, OSError):  # the state file is being rewritten: ask again
        return {}


def _loss_at(sweep_dir: Path, trial_id: str, step: int) -> float:
    """A trial's training loss at ``step``, from its Tune result log."""
    rows = [json.loads(x) for x in (sweep_dir / "tune" / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
    return next(r["train_loss_align"] for r in rows if r.get("train_step") == float(step))


@pytest.mark.heavy
def test_sweep_killed_and_resumed_with_asha_tracking_pareto_and_best_config(
    tiny_llama_dir, tmp_path, ray_local, mlflow_local
):
    import ray
    from mlflow import MlflowClient

    tree = sweep_tree(tiny_llama_dir, tmp_path)
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    sweep_dir = tmp_path / "sweeps" / "e2e"

    # ---- run `raysafe sweep` in a subprocess joined to this session's Ray; kill it once the first trial is over
    log_path = tmp_path / "sweep-subprocess.log"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raysafe.cli", "-q", "sweep", str(cfg_path)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 900
        while "TERMINATED" not in (st := _trial_statuses(sweep_dir / "tune")).values():
            assert proc.poll() is None, f"the sweep ended before it was killed:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial ended in time:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        proc.send_signal(signal.SIGKILL)  # its trials (and their Train runs) die with the driver's Ray job
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    t_kill = time.perf_counter() - t0
    assert len(st) == 2 and list(st.values()).count("TERMINATED") == 1, st
    first = next(t for t, s in st.items() if s == "TERMINATED")
    mtime = (sweep_dir / "trials" / first / "result.json").stat().st_mtime
    parent_before = json.loads((sweep_dir / "sweep_state.json").read_text())["parent_run_id"]

    # ---- the same config again resumes the sweep
    cfg = load_config(SweepConfig, cfg_path)
    res = run_sweep(cfg, progress=False)
    print(f"\nkilled after {t_kill:.0f} s; the resumed sweep took {res.seconds:.0f} s\n" + res.summary())
    assert res.resumed and res.mlflow_run_id == parent_before
    table = res.table
    assert table.height == 2
    a = table.filter(table["lr"] == 2e-3).row(0, named=True)
    b = table.filter(table["lr"] == 1e-9).row(0, named=True)
    assert a["trial_id"] == first  # the grid order: A ran first
    # A finished before the kill and was not run again
    assert a["status"] == "finished" and a["train_step"] == 3.0
    assert len((sweep_dir / "trials" / first / "attempts.jsonl").read_text().splitlines()) == 1
    assert (sweep_dir / "trials" / first / "result.json").stat().st_mtime == mtime
    assert 0 <= a["safety_mean"] <= 1 and 0 <= a["utility_accuracy"] <= 1 and -1 <= a["utility_drop"] <= 1
    assert a["objective"] == pytest.approx(score(a, cfg.objective.primary, cfg.objective.terms))
    assert Path(a["model_dir"], "config.json").exists() and a["best"] and a["pareto"]
    # B ran after the resume, and ASHA — with A's rung record from before the kill — stopped it at step 2
    assert b["status"] == "stopped" and b["train_step"] == 2.0 and not b["best"]
    assert b["train_loss_align"] > _loss_at(sweep_dir, a["trial_id"], 2), "B was stopped without lagging"
    assert not (sweep_dir / "trials" / b["trial_id"] / "result.json").exists()  # never evaluated or scored

    # ---- MLflow: one parent run (continued), the baseline evaluation once, one child run per trial with its params
    # and metrics; the trial's training (and, when evaluated, evaluation) runs are its children; none left RUNNING
    client = MlflowClient(mlflow_local)
    parent = client.get_run(res.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raysafe.flow"] == "sweep"
    assert parent.data.metrics["best_objective"] == pytest.approx(a["objective"])
    assert parent.data.metrics["trials_finished"] == 1 and parent.data.metrics["trials_stopped"] == 1
    assert "baseline_utility_accuracy" in parent.data.metrics
    assert {"results.parquet", "results.csv", "pareto.png", "best_train_config.yaml"} <= {
        x.path for x in client.list_artifacts(res.mlflow_run_id)
    }
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    assert sorted(c.data.tags.get("raysafe.flow") for c in children) == ["evaluate", "sweep-trial", "sweep-trial"]
    runs = {c.data.tags["raysafe.trial_id"]: c for c in children if c.data.tags["raysafe.flow"] == "sweep-trial"}
    ca, cb = runs[a["trial_id"]], runs[b["trial_id"]]
    assert float(ca.data.params["param.lr"]) == 2e-3 and float(cb.data.params["param.lr"]) == 1e-9
    assert ca.data.params["mixture.languages"] == "en,zh,ru" and ca.data.params["mlc.layer_resolved"] == "2"
    assert ca.data.metrics["objective"] == pytest.approx(a["objective"])
    assert ca.data.metrics["utility_drop"] == pytest.approx(a["utility_drop"])
    # steps 1-2 were reported while training ran, step 3 with the evaluation; B's last report was step 2
    assert [m.step for m in client.get_metric_history(ca.info.run_id, "train_loss_align")] == [1, 2, 3]
    assert max(m.step for m in client.get_metric_history(cb.info.run_id, "train_loss_align")) == 2
    assert "stopped by the scheduler after step 2" in cb.data.tags["raysafe.trial_status"]
    assert ca.info.status == "FINISHED" and cb.info.status == "KILLED"
    for c, flows in ((ca, {"evaluate", "train"}), (cb, {"train"})):
        grandchildren = client.search_runs([exp], f"tags.mlflow.parentRunId = '{c.info.run_id}'")
        assert {g.data.tags["raysafe.flow"] for g in grandchildren} == flows
        assert all(g.info.status in ("FINISHED", "KILLED") for g in grandchildren)

    # ---- the Pareto figure and the ready-to-run best config
    png = res.paths["pareto_plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    best_cfg = load_config(TrainConfig, res.paths["best_config"])
    assert best_cfg.optim.lr == 2e-3 and best_cfg.checkpoint.name == "e2e-best"
    assert best_cfg.checkpoint.storage_path == str(tmp_path / "base-train")  # not the finished trial's run
    assert best_cfg.tracking.experiment == "test-sweep-train" and best_cfg.ray.num_workers == 1
