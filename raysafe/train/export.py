"""The Hugging Face export of a training checkpoint, built on the CPU from a full state dict.

Two sources of the state dict, one export:

- the end of a training call (``raysafe.train.checkpoint.write_checkpoint(export=True)``): the live engine's weights,
  gathered on rank 0 (ZeRO-3: DeepSpeed's ``_zero3_consolidated_16bit_state_dict``, a collective);
- ``raysafe export CHECKPOINT_DIR`` (:func:`export_checkpoint`): the DeepSpeed files of any checkpoint, read on the
  CPU without Ray or a GPU (the module states for ZeRO-0; DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``,
  the fp32 master weights, for ZeRO-1/2/3), after the checkpoint's manifest of digests has been checked.

What is written (:func:`export_state_dict`)::

    model/      config, safetensors weights, tokenizer, MLC head: a plain model any flow loads by path
    adapter/    LoRA runs only: peft's adapter_config.json + adapter_model.safetensors (and the MLC head)

A LoRA policy is rebuilt on the meta device (no memory), given the trained tensors, saved as an adapter, and merged
on the CPU (``merge_and_unload``) for ``model/`` — never a copy of the model on the training device.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raysafe.errors import OutputError
from raysafe.train.checkpoint import ADAPTER_DIR, CONFIG_FILE, DS_DIR, HF_DIR, PROBE_FILE, STATE_FILE
from raysafe.train.config import TrainConfig

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"


def _split(state_dict: dict) -> tuple[dict, dict]:
    """(policy tensors, MLC head tensors) of an ``AlignModule`` state dict, prefixes removed, on the CPU."""
    policy, head = {}, {}
    for k, v in state_dict.items():
        if k.startswith("policy."):
            policy[k.removeprefix("policy.")] = v.detach().cpu()
        elif k.startswith("head."):
            head[k.removeprefix("head.")] = v.detach().cpu()
    return policy, head


def _dtype(tensors: dict) -> torch.dtype:
    return next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)


def rebuild_policy(cfg: TrainConfig, policy_sd: dict):
    """The trained policy as a CPU module holding exactly ``policy_sd`` (a peft model for LoRA runs): built on the
    meta device from the base model's config, then given the tensors (no second copy, no random init). Only good for
    saving and merging: its non-persistent buffers are left on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raysafe.models.loading import resolve

    resolved = resolve(cfg.model)
    config = AutoConfig.from_pretrained(
        resolved.path, revision=resolved.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=_dtype(policy_sd), trust_remote_code=cfg.model.trust_remote_code
        )
    if cfg.lora.enabled:
        from peft import get_peft_model

        from raysafe.train.worker import lora_config

        model = get_peft_model(model, lora_config(cfg))
        model.peft_config["default"].base_model_name_or_path = resolved.path
    missing, unexpected = model.load_state_dict(policy_sd, strict=False, assign=True)
    tied = {k for k in missing if _is_tied(model, k)}
    if unexpected or set(missing) - tied:
        raise OutputError(
            f"the checkpoint's weights do not fit model {cfg.model.path!r}: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}",
            where="train_config.yaml: model / lora",
            fix="export with the train_config.yaml the checkpoint was written with, and the same base model",
        )
    base = model.get_base_model() if cfg.lora.enabled else model
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()
    # non-persistent buffers (rotary frequencies) stay on the meta device: they are neither saved nor merged
    left = [n for n, t in base.named_parameters() if t.is_meta]
    if left:
        raise OutputError(
            f"parameters {left[:5]} of {cfg.model.path!r} are not in the checkpoint",
            where="export",
            fix="export with the train_config.yaml the checkpoint was written with, and the same base model",
        )
    return model


def _is_tied(model, key: str) -> bool:
    """Whether ``key`` is the output embedding tied to the input embedding (stored once)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "tie_word_embeddings", False) and key.endswith("lm_head.weight")


def _save_head(head_sd: dict, cfg: TrainConfig, hidden: int, out: Path) -> None:
    if not head_sd:
        return
    from raysafe.train.mlc import MLCHead

    head = MLCHead(hidden, cfg.mlc.d, cfg.mlc.head, cfg.seed)
    head.load_state_dict(head_sd)
    head.save(out)


def export_state_dict(state_dict: dict, cfg: TrainConfig, tok, out: Path, merge: bool = True) -> list[Path]:
    """Write ``out/model`` (a plain model; for LoRA only when ``merge``) and, for LoRA, ``out/adapter``; return the
    directories written. ``state_dict`` is the ``AlignModule``'s (keys ``policy.*`` and ``head.*``)."""
    policy_sd, head_sd = _split(state_dict)
    if cfg.lora.enabled and merge:  # merging writes into the base layers: never into the caller's (live) tensors
        policy_sd = {k: (v.clone() if ".base_layer." in k else v) for k, v in policy_sd.items()}
    model = rebuild_policy(cfg, policy_sd)
    hidden = (model.get_base_model() if cfg.lora.enabled else model).config.hidden_size
    written = []
    if cfg.lora.enabled:
        adapter = out / ADAPTER_DIR
        model.save_pretrained(adapter, safe_serialization=True)  # peft: the adapter only
        _save_head(head_sd, cfg, hidden, adapter)
        written.append(adapter)
        if not merge:
            return written
        model = model.merge_and_unload()  # on the CPU, on the rebuilt module
    target = out / HF_DIR
    model.save_pretrained(target, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(target)
    _save_head(head_sd, cfg, hidden, target)
    written.append(target)
    return written


# ------------------------------------------------------------------------------------------- from a checkpoint
def checkpoint_state_dict(ckpt_dir: Path, stage: int) -> dict:
    """The ``AlignModule`` state dict of a checkpoint's DeepSpeed files, on the CPU (call after the manifest check)."""
    ds_dir = ckpt_dir / DS_DIR
    if stage == 0:
        states = ds_dir / "ds" / "mp_rank_00_model_states.pt"
        return torch.load(states, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="ds")


@dataclass
class ExportResult:
    checkpoint_dir: Path
    out: Path
    written: list[Path]
    max_abs_diff: dict[str, float]
    reused: bool = False

    def summary(self) -> str:
        lines = [f"{'already exported' if self.reused else 'exported'} {self.checkpoint_dir}"]
        for d in self.written:
            diff = self.max_abs_diff.get(d.name)
            check = f" (probe round trip: max |Δ log-prob| {diff:.2e})" if diff is not None else ""
            lines.append(f"  {d}{check}")
        return "\n".join(lines)


def _source_identity(ckpt_dir: Path) -> dict:
    """What the export is the export of: the checkpoint's manifests (digests of every file it holds)."""
    from raysafe.identity import digest
    from raysafe.train.manifest import MANIFEST_DIR

    manifests = {p.name: json.loads(p.read_text()) for p in sorted((ckpt_dir / MANIFEST_DIR).glob("rank-*.json"))}
    return {"checkpoint": str(ckpt_dir), "manifests": digest(manifests)}


def _verify(out: Path, written: list[Path], probe_file: Path) -> dict[str, float]:
    from raysafe.train.checkpoint import verify_adapter, verify_model

    diffs = {}
    for d in written:
        diffs[d.name] = verify_model(d, probe_file) if d.name == HF_DIR else verify_adapter(d, probe_file)
    return diffs


def export_checkpoint(ckpt_dir: str | Path, out: str | Path | None = None, merge: bool = False) -> ExportResult:
    """``raysafe export``: the Hugging Face export of any training checkpoint, built on the CPU from its DeepSpeed
    files, with the probe round trip checked. ``out`` defaults to ``<run dir>/exports/<checkpoint name>``; an
    ``out`` that holds the export of exactly this checkpoint (same manifests, same ``merge``) is reused, one that
    holds anything else is refused."""
    from raysafe.config import load_config
    from raysafe.models.loading import load_tokenizer
    from raysafe.train.manifest import verify_manifest

    ckpt_dir = Path(ckpt_dir).resolve()
    if not (ckpt_dir / STATE_FILE).is_file() or not (ckpt_dir / CONFIG_FILE).is_file():
        raise OutputError(
            f"{ckpt_dir} is not a raysafe training checkpoint (no {STATE_FILE} / {CONFIG_FILE})",
            where=str(ckpt_dir),
            fix="give a checkpoint directory written by `raysafe train` (<storage_path>/<run>/checkpoint_*)",
        )
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    verify_manifest(ckpt_dir, state.get("world_size"))  # before DeepSpeed unpickles anything in it
    cfg = load_config(TrainConfig, ckpt_dir / CONFIG_FILE, check_paths=False)
    out = Path(out).resolve() if out is not None else ckpt_dir.parent / "exports" / ckpt_dir.name
    source = {**_source_identity(ckpt_dir), "merge": bool(merge and cfg.lora.enabled)}
    done = out / EXPORT_FILE
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("source") == source:
            return ExportResult(
                ckpt_dir, out, [out / n for n in previous["written"]], previous["max_abs_diff"], reused=True
            )
        raise OutputError(
            f"{out} holds the export of another checkpoint or setting ({previous.get('source')})",
            where=str(out),
            fix="give another --out, or move that directory away",
        )
    if out.exists() and any(out.iterdir()):
        raise OutputError(
            f"{out} exists and is not an export of this checkpoint", where=str(out), fix="give an empty or new --out"
        )
    if merge and not cfg.lora.enabled:
        log.info("--merge: %s is a full fine-tuning checkpoint, there is no adapter to merge", ckpt_dir)
    sd = checkpoint_state_dict(ckpt_dir, cfg.deepspeed.zero_stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = export_state_dict(sd, cfg, load_tokenizer(cfg.model), tmp, merge=merge)
        del sd
        diffs = _verify(tmp, written, ckpt_dir / PROBE_FILE)
        names = [d.name for d in written]
        (tmp / EXPORT_FILE).write_text(
            json.dumps({"source": source, "step": state["step"], "written": names, "max_abs_diff": diffs}, indent=2)
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(ckpt_dir, out, [out / n for n in names], diffs)
