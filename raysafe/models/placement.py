"""Where an inference model's weights go on the GPUs of one actor, and the refusal when they cannot fit.

An actor that reserves N GPUs (``ray.num_gpus_per_actor: N``, N ≥ 2) sees those N devices (Ray sets
``CUDA_VISIBLE_DEVICES``); a model loaded there for inference (extraction, ``hf`` generation and judges, the sweep's
held-out measure, translation) is split layer-wise across all of them: Hugging Face ``device_map="balanced"`` with a
``max_memory`` per visible GPU, so accelerate puts about 1/N of the decoder blocks on each, the embeddings (and so the
inputs) on the first. A fractional reservation (0.5: two actors share a GPU) gives the actor that share of one GPU.

Before any weight is read the plan checks that the weights fit: their size (from the safetensors headers, or the
parameter count of the model built on the meta device from its config, × the bytes of the dtype they are loaded in)
against the actor's GPU memory less :data:`ACTIVATION_HEADROOM` of every GPU, kept for activations, the KV cache of
generation and the CUDA context. A model that does not fit raises :class:`ModelError` naming the model, its size, the
GPUs' memory and the fixes, instead of an out-of-memory error halfway through loading or a silent offload to CPU/disk.

:func:`plan_placement` is a pure function (sizes in, ``from_pretrained`` keyword arguments or an error out); the rest
of this module gathers its inputs.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from raysafe.errors import ModelError

log = logging.getLogger(__name__)

#: Share of every GPU's memory the weights may not use: left for activations, generation's KV cache and CUDA's own
#: context (about 0.5 GB). 20 % of an 80 GB H100 is 16 GB, enough for a batch of long prompts of a 70B model in bf16.
ACTIVATION_HEADROOM = 0.20

GIB = 1 << 30

#: Bytes per element of the safetensors dtype codes (the header's ``dtype`` field).
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class GpuBudget:
    """The memory one actor may use on one visible GPU: ``index`` (as torch numbers the visible devices), the GPU's
    ``total`` bytes and the actor's ``share`` of it (1.0, or its fraction of a GPU it shares with other actors)."""

    index: int
    total: int
    share: float = 1.0

    @property
    def usable(self) -> int:
        """Bytes the weights may take here: the actor's share less the activation headroom."""
        return int(self.total * self.share * (1.0 - ACTIVATION_HEADROOM))


def plan_placement(label: str, weight_bytes: int, gpus: list[GpuBudget]) -> dict:
    """``from_pretrained`` keyword arguments that place the model ``label`` of ``weight_bytes`` on ``gpus``.

    ``{}`` for one GPU (the caller moves the model to it); ``{"device_map": "balanced", "max_memory": {i: bytes}}``
    for several, each GPU capped at its usable bytes so that nothing is offloaded to CPU or disk. Raises
    :class:`ModelError` when the weights exceed the usable memory of all of ``gpus`` together (or none is given).
    """
    if not gpus:
        raise ModelError(
            f"model {label!r} is to be loaded on GPU but the actor sees no GPU",
            where=f"model {label}: device",
            fix="reserve GPUs for the actor (ray.num_gpus_per_actor) or run on CPU",
        )
    usable = sum(g.usable for g in gpus)
    if weight_bytes > usable:
        need = math.ceil(weight_bytes / (1.0 - ACTIVATION_HEADROOM) / max(g.total * g.share for g in gpus))
        shown = ", ".join(
            f"cuda:{g.index} {g.total / GIB:.1f} GiB" + (f" × {g.share:g}" if g.share != 1 else "") for g in gpus
        )
        raise ModelError(
            f"model {label!r} does not fit the actor's GPUs: its weights take {weight_bytes / GIB:.1f} GiB, the "
            f"actor's {len(gpus)} GPU(s) ({shown}) hold {usable / GIB:.1f} GiB for weights after keeping "
            f"{ACTIVATION_HEADROOM:.0%} of each for activations and the KV cache",
            where=f"model {label}: ray.num_gpus_per_actor = {sum(g.share for g in gpus):g}",
            fix=f"set ray.num_gpus_per_actor to {need} or more (GPUs of one node), load it in bfloat16 "
            "(model dtype: bfloat16) if it is float32, or generate with the vllm backend and tensor parallelism",
        )
    if len(gpus) == 1:
        return {}
    return {"device_map": "balanced", "max_memory": {g.index: g.usable for g in gpus}}


# ------------------------------------------------------------------------------------------- weights' size
def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name → dtype, shape, offsets); the weights are not read."""
    with Path(path).open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def header_numel(header: dict) -> int:
    """Number of elements of all tensors a safetensors header lists (``__metadata__`` skipped)."""
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def safetensors_numel(model_dir: Path) -> int | None:
    """Parameter count of a model directory from its safetensors headers (the shards its index names, else every
    ``*.safetensors`` file at the top level); None when it holds none."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    return sum(header_numel(safetensors_header(f)) for f in files)


def config_numel(hf_config) -> int:
    """Parameter count of the causal LM (or, for an encoder-decoder config, the seq2seq LM) ``hf_config`` describes,
    built on the meta device (no memory, no weights); tied embeddings counted once."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        auto = AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -------------------------------------------------------------------------------------------- the actor's GPUs
def ray_gpu_share() -> float:
    """The actor's share of a GPU when Ray gave it a fraction of one (``num_gpus=0.5`` → 0.5), else 1.0 (whole GPUs,
    or not in a Ray worker)."""
    try:
        import ray

        if not ray.is_initialized():
            return 1.0
        gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # outside a worker, or a Ray without the runtime context: no fraction to apply
        return 1.0
    return gpus if 0.0 < gpus < 1.0 else 1.0


def actor_gpus(device: torch.device) -> list[GpuBudget]:
    """The GPUs a model loaded for ``device`` may use: every visible GPU for ``cuda`` without an index (an actor's
    GPUs: Ray makes exactly those visible), only that one for ``cuda:i``."""
    indices = [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
    share = ray_gpu_share()
    return [GpuBudget(i, torch.cuda.get_device_properties(i).total_memory, share) for i in indices]


def check_placed(label: str, model) -> None:
    """Raise :class:`ModelError` if loading put any module off the GPUs (accelerate offloads what does not fit to
    CPU or disk: slow, and not what the plan asked for)."""
    placed = getattr(model, "hf_device_map", None) or {}
    off = sorted(k for k, d in placed.items() if str(d) in ("cpu", "disk", "meta"))
    if off:
        raise ModelError(
            f"model {label!r} was partly placed off the GPUs ({', '.join(off[:5])}{' …' if len(off) > 5 else ''})",
            where=f"model {label}: device map",
            fix="raise ray.num_gpus_per_actor or load in bfloat16 (model dtype: bfloat16)",
        )
