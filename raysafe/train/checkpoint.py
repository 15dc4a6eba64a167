"""Training checkpoints: DeepSpeed shards for resuming, a probe for checking any export, and — at the end of a
training call only — the Hugging Face export every other flow loads.

A checkpoint directory holds::

    deepspeed/            each rank's ZeRO shard + optimiser state (DeepSpeed's format; read back on resume and by
                          `raysafe export`)
    model/                the last checkpoint of a call only: consolidated safetensors + tokenizer + MLC head
                          (mlc_head.safetensors, mlc_head.json); LoRA: the adapter merged into the base weights
    adapter/              the last checkpoint of a LoRA call only: peft's adapter_config.json +
                          adapter_model.safetensors (+ MLC head)
    trainer_state.json    step, per-step record (group ids consumed, losses), model path, last metrics, world size,
                          data position (global micro-batches consumed)
    probe.safetensors     the run's first micro-batch and the policy's log-probs on it when the checkpoint was taken
    run_identity.json     the identity of the run that wrote it (raysafe.train.identity)
    train_config.yaml     the config of the call that wrote it
    rng/rank-NNNNN.safetensors   each worker's random-number state (torch, CUDA, numpy, Python)
    manifest/rank-NNNNN.json     SHA-256 of every file each worker wrote, checked before anything is loaded

Any other checkpoint is exported on demand on the CPU: ``raysafe export CHECKPOINT_DIR`` (raysafe.train.export).
:func:`verify_model` / :func:`verify_adapter` reload an export and recompute the probe's log-probs: an export that
does not round-trip (wrong consolidation, a LoRA merge gone wrong, a dtype change) shows up as a difference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

STATE_FILE = "trainer_state.json"
HF_DIR = "model"
ADAPTER_DIR = "adapter"
DS_DIR = "deepspeed"
PROBE_FILE = "probe.safetensors"
CONFIG_FILE = "train_config.yaml"
_PROBE_TENSORS = ("input_ids", "attention_mask", "position_ids", "labels")


@torch.no_grad()
def probe_logps(policy: nn.Module, probe: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """Chosen/rejected answer log-probs of the probe batch under the current weights (collective under ZeRO-3)."""
    from raysafe.train.forward import policy_forward

    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in probe.items()}
    was_training = policy.training
    policy.eval()
    try:
        out = policy_forward(policy, batch, None)
    finally:
        policy.train(was_training)
    return {"chosen_logps": out.chosen_logps.float().cpu(), "rejected_logps": out.rejected_logps.float().cpu()}


def save_probe(path: Path, probe: dict, expected: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: probe[k].contiguous().cpu() for k in _PROBE_TENSORS}
    tensors.update({f"expected.{k}": v.contiguous() for k, v in expected.items()})
    save_file(tensors, str(path), metadata={"n_pairs": str(int(probe["n_pairs"])), "m": str(int(probe["m"]))})


def load_probe(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {k.removeprefix("expected."): v for k, v in tensors.items() if k.startswith("expected.")}
    probe = {k: tensors[k] for k in _PROBE_TENSORS}
    probe.update(n_pairs=int(meta["n_pairs"]), m=int(meta["m"]))
    return probe, expected


def verify_model(model_dir: str | Path, probe_file: str | Path, device: str = "cpu") -> float:
    """Reload ``model_dir`` as a plain model; the largest |Δ log-prob| against the probe's stored log-probs."""
    from raysafe.config import ModelSpec
    from raysafe.models.loading import load_causal_lm

    model = load_causal_lm(ModelSpec(path=str(model_dir), dtype="float32"), torch.device(device))
    return _probe_diff(model, probe_file, device)


def verify_adapter(adapter_dir: str | Path, probe_file: str | Path, device: str = "cpu") -> float:
    """Load the base model the adapter names plus the adapter with peft (not merged); the largest |Δ log-prob|
    against the probe's stored log-probs."""
    from peft import PeftConfig, PeftModel

    from raysafe.config import ModelSpec
    from raysafe.models.loading import load_causal_lm

    base_path = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = load_causal_lm(ModelSpec(path=base_path, dtype="float32"), torch.device(device))
    return _probe_diff(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), probe_file, device)


def _probe_diff(model: nn.Module, probe_file: str | Path, device: str) -> float:
    probe, expected = load_probe(Path(probe_file))
    got = probe_logps(model, probe, torch.device(device))
    return max(float((got[k] - expected[k]).abs().max()) for k in expected)


def verify_checkpoint(ckpt_dir: str | Path, device: str = "cpu") -> float:
    """:func:`verify_model` of a checkpoint's own ``model/`` (the last checkpoint of a training call)."""
    ckpt_dir = Path(ckpt_dir)
    return verify_model(ckpt_dir / HF_DIR, ckpt_dir / PROBE_FILE, device)


def write_checkpoint(
    engine,
    tok,
    cfg,
    step: int,
    record: list,
    metrics: dict,
    rank: int,
    probe: dict,
    expected: dict[str, torch.Tensor],
    identity: dict,
    world: int,
    micro_batches: int,
    export: bool = False,
) -> None:
    """Every rank saves its DeepSpeed shard and random-number state; rank 0 adds the trainer state, the run identity
    and the probe, and with ``export`` (the last checkpoint of a call) the Hugging Face export built on the CPU from
    the gathered weights (ZeRO-3: DeepSpeed's consolidation, a collective every rank joins); each rank lists its
    files' digests in a manifest; then ``ray.train.report(checkpoint=...)`` persists the union of the ranks' files
    as one checkpoint."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from raysafe.atomic import atomic_write_json
    from raysafe.train.identity import IDENTITY_FILE
    from raysafe.train.manifest import write_manifest
    from raysafe.train.rng import rng_file, save_rng

    tmp = Path(tempfile.mkdtemp(prefix="raysafe-ckpt-"))
    save_rng(rng_file(tmp, rank))  # first: nothing below draws random numbers, but keep the state of the step
    engine.save_checkpoint(str(tmp / DS_DIR), tag="ds")
    if export:
        if cfg.deepspeed.zero_stage == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; the full dict lands on rank 0
        else:
            state_dict = engine.module.state_dict() if rank == 0 else None
        if rank == 0:
            from raysafe.train.export import export_state_dict

            export_state_dict(state_dict, cfg, tok, tmp, merge=True)
        del state_dict
    if rank == 0:
        save_probe(tmp / PROBE_FILE, probe, expected)
        (tmp / STATE_FILE).write_text(
            json.dumps(
                {
                    "step": step,
                    "record": record,
                    "model": cfg.model.label,
                    "model_path": cfg.model.path,
                    "metrics": metrics,
                    "world_size": world,
                    "micro_batches": micro_batches,
                    "exported": export,
                },
                default=float,
            )
        )
        atomic_write_json(tmp / IDENTITY_FILE, identity)
        from raysafe.config import dump_config

        (tmp / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")  # the config of the call that wrote it
    write_manifest(tmp, rank)
    if dist.is_initialized():
        dist.barrier()
    ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=Checkpoint.from_directory(str(tmp)))
    shutil.rmtree(tmp, ignore_errors=True)
