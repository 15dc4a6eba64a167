"""LoRA end to end (issue 22 item 4) on a real local Ray instance: one Ray Train worker (kept to one so the test stays
short; two workers under ZeRO-3 are tested by test_train_flow.py), DeepSpeed ZeRO-3 on the CPU (the policy
partitioned at load, peft on the partitioned model): train, checkpoint, stop and resume, export at the end and on
demand from an intermediate checkpoint (``raysafe export``), and reload equals. The reader of every stage's
DeepSpeed files is tested against the live weights in test_zero3_load.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_flow import tiny_config

from raysafe.cli import main
from raysafe.config import ModelSpec
from raysafe.errors import ModelError, OutputError
from raysafe.train.checkpoint import PROBE_FILE, STATE_FILE, load_probe, probe_logps, verify_adapter, verify_checkpoint
from raysafe.train.export import export_checkpoint
from raysafe.train.flow import run_train

pytestmark = pytest.mark.slow


def _cfg(model_dir, out, **over):
    base = {
        "optim.max_steps": 3,
        "optim.epochs": 3,
        "loss.name": "simpo",  # no reference model: nothing but the LoRA path to wait for
        "checkpoint.every_n_steps": 1,
        "mlc.layer": 1,
        "data.max_length": 96,
        "data.max_prompt_length": 64,
        "lora.enabled": True,
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.0,
        "tracking.enabled": False,
        "ray.num_workers": 1,
    }
    return tiny_config(model_dir, out, **{**base, **over})


def test_lora_zero3_train_resume_export_reload_equals(ray_local, tiny_llama_dir, tmp_path, capsys):
    cfg = _cfg(tiny_llama_dir, tmp_path / "train")
    first = run_train(_cfg(tiny_llama_dir, tmp_path / "train", **{"checkpoint.stop_after_steps": 1}), progress=False)
    assert first.steps == 1 and (first.model_dir / "config.json").is_file()  # the end of a call exports
    res = run_train(cfg, progress=False)  # continues from the step-1 checkpoint
    assert res.steps == 3 and [r["step"] for r in res.record] == [1, 2, 3]
    assert res.record[0] == first.record[0]

    # the end of the run carries the export: the adapter as an adapter, and the merged plain model
    adapter = res.checkpoint_dir / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert all("lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (
        verify_checkpoint(res.checkpoint_dir) < 1e-4
    )  # merged (float rounding of W + BA) model/ reproduces the trained policy's log-probs
    assert verify_adapter(adapter, res.checkpoint_dir / PROBE_FILE) < 1e-5  # base + adapter with peft, unmerged

    # the adapters did train: the base model's log-probs on the probe differ from the trained policy's
    from raysafe.models.loading import load_causal_lm

    base = load_causal_lm(ModelSpec(path=str(tiny_llama_dir), dtype="float32"), "cpu")
    probe, expected = load_probe(res.checkpoint_dir / PROBE_FILE)
    got = probe_logps(base, probe, torch.device("cpu"))["chosen_logps"]
    assert (got - expected["chosen_logps"]).abs().max() > 1e-4

    # a checkpoint in the middle of the call has no model/: a flow given it is told to run `raysafe export`
    ckpts = [d for d in res.checkpoint_dir.parent.glob("checkpoint_*") if d.is_dir()]
    (mid,) = [d for d in ckpts if json.loads((d / STATE_FILE).read_text())["step"] == 2]
    assert not (mid / "model").exists() and not (mid / "adapter").exists()
    for given in (mid, mid / "model"):
        with pytest.raises(ModelError, match="raysafe export"):
            load_causal_lm(ModelSpec(path=str(given)), "cpu")

    # `raysafe export --merge` builds it on the CPU from the ZeRO-3 shards (fp32 master weights), probe checked
    out = tmp_path / "exp-mid"
    assert main(["export", str(mid), "--out", str(out), "--merge"]) == 0
    assert "probe round trip" in capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    assert set(report["written"]) == {"adapter", "model"} and report["step"] == 2
    assert max(report["max_abs_diff"].values()) < 1e-4

    # the same export again is reused; another checkpoint into the same --out is refused, the directory named
    assert export_checkpoint(mid, out, merge=True).reused
    with pytest.raises(OutputError, match="another checkpoint"):
        export_checkpoint(res.checkpoint_dir, out, merge=True)
    adapter_only = export_checkpoint(mid, tmp_path / "exp-adapter")  # without --merge: the adapter alone
    assert [d.name for d in adapter_only.written] == ["adapter"] and adapter_only.max_abs_diff["adapter"] < 1e-5
