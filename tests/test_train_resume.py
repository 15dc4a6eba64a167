"""Identity, resume, checkpoint manifests and locks of training runs (issue 19 items 1, 6, 7, 8), on a real local Ray
instance with DeepSpeed ZeRO-3 on the CPU and a tiny Llama with attention dropout (so resuming must restore the
random-number state to match an uninterrupted run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_train_flow import tiny_config

from raysafe.errors import OutputError
from raysafe.locks import lock_path
from raysafe.train.flow import run_dir, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dropout_llama_dir(tmp_path_factory):
    from raysafe.models.tiny import save_tiny

    d = save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-dropout", "llama", num_layers=2, hidden=32)
    conf = json.loads((d / "config.json").read_text())
    conf["attention_dropout"] = 0.2
    (d / "config.json").write_text(json.dumps(conf))
    return d


def _cfg(model_dir, out, **over):
    base = {
        "optim.max_steps": 4,
        "optim.epochs": 3,
        "loss.name": "simpo",  # a preference loss without a reference model: no reference pass to wait for
        "checkpoint.every_n_steps": 2,
        "mlc.layer": 1,
        "data.max_length": 96,
        "data.max_prompt_length": 64,
        "deepspeed.zero_stage": 2,
        "tracking.enabled": False,
    }
    return tiny_config(model_dir, out, **{**base, **over})


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_killed_and_resumed_run_is_bit_identical_changed_config_refused_tampering_refused(
    ray_local, dropout_llama_dir, tmp_path
):
    # the uninterrupted run
    full = run_train(_cfg(dropout_llama_dir, tmp_path / "a"), progress=False)
    assert full.steps == 4

    # the same run stopped after 2 steps (fresh worker processes next time, as after a kill)
    cfg = _cfg(dropout_llama_dir, tmp_path / "b")
    part = run_train(_cfg(dropout_llama_dir, tmp_path / "b", **{"checkpoint.stop_after_steps": 2}), progress=False)
    assert part.steps == 2 and "stopped after 2 of 4 steps" in part.summary()
    assert (part.checkpoint_dir / "rng" / "rank-00001.safetensors").is_file()

    # another learning rate into the same run directory: refused before any worker, the field named, both ways out
    changed = _cfg(dropout_llama_dir, tmp_path / "b", **{"optim.lr": 1e-3})
    with pytest.raises(OutputError) as e:
        run_train(changed, progress=False)
    msg = str(e.value)
    assert "optim.lr: 0.002 → 0.001" in msg and "checkpoint.name=" in msg and "--restart" in msg
    assert "mlc" not in msg.split("Differing fields")[1].split("where")[0]  # only what differs is named

    # a tampered checkpoint file is refused before DeepSpeed unpickles it
    shard = sorted((part.checkpoint_dir / "deepspeed").rglob("*.pt"))[0]
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(OutputError) as e:
        run_train(cfg, progress=False)
    assert "SHA-256 mismatch" in str(e.value) and shard.name in str(e.value)
    shard.write_bytes(original)

    # the same config resumes from step 2 and ends bit for bit where the uninterrupted run ended
    resumed = run_train(cfg, progress=False)
    assert resumed.steps == 4 and [r["step"] for r in resumed.record] == [1, 2, 3, 4]
    assert resumed.record == full.record  # same batches, same losses at every step
    a, b = _weights(full.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    # --restart moves the old run aside (kept) and starts afresh under the new settings
    from raysafe.train.flow import claim_run_dir, identity_of, validate

    claim_run_dir(changed, identity_of(changed, validate(changed)[0]), restart=True)
    aside = list((tmp_path / "b").glob(f"{run_dir(cfg).name}.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "run_identity.json").is_file()
    assert json.loads((run_dir(cfg) / "run_identity.json").read_text())["optim.lr"] == 1e-3
    assert not list(run_dir(cfg).glob("checkpoint_*"))


def test_second_run_on_a_locked_run_directory_names_the_holder(dropout_llama_dir, tmp_path, caplog):
    cfg = _cfg(dropout_llama_dir, tmp_path / "c")
    lock = lock_path(run_dir(cfg))
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(
            json.dumps(
                {
                    "host": __import__("socket").gethostname(),
                    "pid": holder.pid,
                    "command": "raysafe train other.yaml",
                    "started": "2026-01-01T00:00:00+00:00",
                }
            )
        )
        with pytest.raises(OutputError) as e:
            run_train(cfg, progress=False)
        assert f"pid {holder.pid}" in str(e.value) and "raysafe train other.yaml" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a warning (and released at the end)
    from raysafe.locks import output_lock

    with output_lock(run_dir(cfg), "training run"):
        assert json.loads(lock.read_text())["pid"] != holder.pid
    assert "stale lock" in caplog.text and not lock.exists()
