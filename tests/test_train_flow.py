"""The alignment flow on a real local Ray instance: Ray Train workers running DeepSpeed ZeRO-3 on the CPU.

Tiny random Llama, the bundled English preference pairs with their prompt variants in 10 languages.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from raysafe.config import load_config, set_path
from raysafe.errors import ConfigError, DataError, OutputError
from raysafe.train.checkpoint import STATE_FILE, verify_checkpoint
from raysafe.train.config import TrainConfig
from raysafe.train.data import epoch_order, load_samples
from raysafe.train.flow import run_train, validate

pytestmark = pytest.mark.slow


def tiny_config(model_dir, out, **over) -> TrainConfig:
    tree = {
        "model": {"path": str(model_dir), "name": "tiny"},
        # 8 pairs, 2 optimiser steps per epoch: the loss must fall on data the model has seen
        "data": {
            "max_length": 160,
            "max_prompt_length": 128,
            "pairs": {"kind": "fixture", "name": "preference_pairs", "limit_per_lang": 8},
        },
        "mixture": {"languages": ["en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku"], "m": 4},
        "mlc": {"weight": 0.8, "layer": 2, "d": 32, "every_k": 2},
        "optim": {"lr": 2e-3, "epochs": 6, "micro_batch": 2, "grad_accum": 1, "warmup_ratio": 0.0, "max_steps": 8},
        # small buckets, as docs/training.md advises for small models: DeepSpeed must take them
        "deepspeed": {"zero_stage": 3, "reduce_bucket_size": 2_000_000, "prefetch_bucket_size": 2_000_000},
        "checkpoint": {"every_n_steps": 4, "storage_path": str(out)},
        "ray": {"num_workers": 2, "torch_threads": 1},
    }
    for k, v in over.items():
        set_path(tree, k, v)
    return load_config(TrainConfig, data=tree)


def expected_groups(cfg: TrainConfig) -> list[str]:
    """The deterministic global order of pairs the run must consume."""
    samples = load_samples(cfg.data, cfg.mixture, cfg.seed)
    order = epoch_order(samples.height, cfg.optim.epochs, cfg.seed).join(samples, on="sample_idx").sort("pos")
    return order["group_id"].to_list()


def consumed(record: list[dict]) -> list[str]:
    return [g for r in record for g in r["groups"]]


def test_zero3_two_workers_loss_goes_down_and_checkpoint_round_trips(ray_local, mlflow_local, tiny_llama_dir, tmp_path):
    from mlflow import MlflowClient

    # MLC on the final state after the final norm (the released setting): its hook sits on the norm, under ZeRO-3
    cfg = tiny_config(tiny_llama_dir, tmp_path / "train", **{"mlc.layer": "final"})
    res = run_train(cfg, progress=False)

    assert res.steps == 8 and [r["step"] for r in res.record] == list(range(1, 9))
    losses = [r["loss_align"] for r in res.record]  # the DPO term: comparable across MLC-on and MLC-off steps
    assert sum(losses[-2:]) / 2 < 0.6 * sum(losses[:2]) / 2, losses
    assert consumed(res.record) == expected_groups(cfg)[: 8 * 4]
    assert [r["mlc_active"] for r in res.record] == [s % 2 == 0 for s in range(8)]

    # the exported HF directory reloads as a plain model and reproduces the policy's log-probs
    assert verify_checkpoint(res.checkpoint_dir) < 1e-5
    assert (res.model_dir / "mlc_head.safetensors").exists() and (res.model_dir / "config.json").exists()

    client = MlflowClient(mlflow_local)
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["checkpoint"] == str(res.checkpoint_dir)
    # lineage: the checkpoint's identity and an external MLflow model whose source is this run
    from raysafe.identity import digest

    ident = digest(json.loads((res.checkpoint_dir / "run_identity.json").read_text()))
    assert run.data.tags["raysafe.checkpoint.identity"] == ident and run.data.tags["raysafe.checkpoint.step"] == "8"
    model = client.get_logged_model(run.data.tags["raysafe.checkpoint.model_id"])
    assert model.source_run_id == res.mlflow_run_id and model.params["checkpoint"] == str(res.checkpoint_dir)
    history = client.get_metric_history(res.mlflow_run_id, "loss_total")
    assert [m.step for m in history] == list(range(1, 9))
    for key in ("loss_mlc", "mlc_rank1_energy", "align_rewards_accuracy", "tokens_per_s", "memory_mb"):
        assert key in run.data.metrics, key
    (data,) = run.inputs.dataset_inputs  # the samples the run trained on, logged by the driver
    assert len(data.dataset.digest) == 20 and json.loads(data.dataset.profile)["num_rows"] > 0
    assert {(t.key, t.value) for t in data.tags} == {("mlflow.data.context", "training")}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bucket_sizes_reach_the_deepspeed_config(tiny_llama_dir, tmp_path, stage):
    from raysafe.train.ds_config import deepspeed_config

    cfg = tiny_config(tiny_llama_dir, tmp_path, **{"deepspeed.zero_stage": stage})
    zero = deepspeed_config(cfg.deepspeed, cfg.optim, on_gpu=False)["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("reduce_bucket_size") == (2_000_000 if stage >= 2 else None)
    assert zero.get("stage3_prefetch_bucket_size") == (2_000_000 if stage == 3 else None)


def _session_train_workers() -> list[int]:
    """PIDs of this Ray session's RayTrainWorker processes (children of this session's raylet)."""
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if not (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):
                continue
            if any(session in " ".join(a.cmdline()) for a in p.parents()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.heavy
def test_worker_killed_mid_run_resumes_without_lost_or_repeated_batches(
    ray_local, mlflow_local, tiny_llama_dir, tmp_path
):
    cfg = tiny_config(
        tiny_llama_dir,
        tmp_path / "train",
        **{"optim.max_steps": 9, "checkpoint.every_n_steps": 3, "checkpoint.max_failures": 1, "mlc.every_k": 1},
    )
    killed: dict[str, object] = {}

    def inject_fault():
        deadline = time.time() + 600
        while time.time() < deadline and "pid" not in killed:
            states = list((tmp_path / "train").glob(f"*/checkpoint_*/{STATE_FILE}"))
            if states and json.loads(states[0].read_text())["step"] >= 3:
                pids = _session_train_workers()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.update(pid=pids[-1], after_step=json.loads(states[0].read_text())["step"])
                    return
            time.sleep(0.2)

    t = threading.Thread(target=inject_fault, daemon=True)
    t.start()
    res = run_train(cfg, progress=False)
    t.join(timeout=5)

    assert "pid" in killed, "the fault was never injected"
    assert res.steps == 9 and [r["step"] for r in res.record] == list(range(1, 10))
    assert consumed(res.record) == expected_groups(cfg)[: 9 * 4]  # nothing lost, nothing repeated
    assert verify_checkpoint(res.checkpoint_dir) < 1e-5


# ---------------------------------------------------------------------------------- refused before any worker
def _write_pairs(tmp_path, variants_by_group: dict[str, list[tuple[str, str]]]):
    pairs, variants = tmp_path / "pairs.jsonl", tmp_path / "variants.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"group_id": g, "prompt": "How do I bake bread?", "chosen": "Mix flour.", "rejected": "No."})
            + "\n"
            for g in variants_by_group
        )
    )
    variants.write_text(
        "".join(
            json.dumps({"group_id": g, "lang": lg, "text": t}, ensure_ascii=False) + "\n"
            for g, vs in variants_by_group.items()
            for lg, t in vs
        )
    )
    return {
        "data.pairs": {"kind": "file", "path": str(pairs)},
        "data.variants": {"kind": "file", "path": str(variants)},
        "data.split": None,
    }


def test_missing_variant_language_is_refused_with_group_and_language(tiny_llama_dir, tmp_path):
    en, ru, sw = ("en", "How do I bake bread?"), ("ru", "Как испечь хлеб?"), ("sw", "Ninaokaje mkate?")
    # one pair lacks the Swahili variant the mixture needs for every pair
    over = _write_pairs(tmp_path, {"g1": [en, ru, sw], "g2": [en, ru]})
    cfg = tiny_config(
        tiny_llama_dir, tmp_path / "o", **over, **{"mixture.languages": ["en", "ru", "sw"], "mixture.m": 3}
    )
    with pytest.raises(DataError) as e:
        validate(cfg)
    assert "'g2'" in str(e.value) and "sw" in str(e.value)
    # no pair has it at all
    over = _write_pairs(tmp_path, {"g1": [en, ru], "g2": [en, ru]})
    cfg = tiny_config(
        tiny_llama_dir, tmp_path / "o", **over, **{"mixture.languages": ["en", "ru", "sw"], "mixture.m": 3}
    )
    with pytest.raises(DataError) as e:
        validate(cfg)
    assert "['sw']" in str(e.value) and "available: ['en', 'ru']" in str(e.value)


def test_resume_from_another_models_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    ck = tmp_path / "checkpoint_000001"
    ck.mkdir()
    (ck / STATE_FILE).write_text(json.dumps({"step": 3, "record": [], "model_path": "Qwen/Qwen2.5-7B-Instruct"}))
    cfg = tiny_config(tiny_llama_dir, tmp_path / "o", **{"checkpoint.resume_from": str(ck)})
    with pytest.raises(OutputError) as e:
        validate(cfg)
    assert "Qwen/Qwen2.5-7B-Instruct" in str(e.value) and str(ck) in str(e.value)


@pytest.mark.parametrize(
    "ds, needle",
    [
        ({"zero_stage": 3, "offload_optimizer": True}, "CPU"),
        ({"zero_stage": 2, "offload_params": True}, "stage 3"),
        ({"zero_stage": 2, "precision": "bf16"}, "bf16"),
    ],
)
def test_impossible_zero_offload_combination_is_refused(tiny_llama_dir, tmp_path, ds, needle):
    cfg = tiny_config(tiny_llama_dir, tmp_path / "o", deepspeed=ds)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_mlc_layer_beyond_depth_is_refused(tiny_llama_dir, tmp_path):
    cfg = tiny_config(tiny_llama_dir, tmp_path / "o", **{"mlc.layer": 40})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "40" in str(e.value)
