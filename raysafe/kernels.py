"""The start-of-job kernel check: which attention kernel each model of a flow will run with, and which DeepSpeed ops
are prebuilt or can be compiled here. Called once per flow, by :func:`raysafe.cli.run_flow` (the CLI and every
``jobs/<flow>.py`` go through it); it logs and never fails: a kernel that cannot work makes the model load or the
DeepSpeed engine fail later with the library's own message, and this report says why beforehand.

Attention (``ModelSpec.attn_implementation``): ``eager`` is the plain PyTorch attention; ``sdpa`` is
``torch.nn.functional.scaled_dot_product_attention``, which on a CUDA GPU of compute capability ≥ 8.0 (A100, A10G,
L4, H100) in bf16/fp16 runs its FlashAttention kernel, else its memory-efficient or math kernel, and on a CPU its C++
kernel; ``flash_attention_2`` needs the ``flash_attn`` package (built into the cluster image, cluster/Dockerfile),
a CUDA GPU of capability ≥ 8.0 and bf16/fp16 weights, otherwise transformers refuses to load the model.

DeepSpeed ops (what ``ds_report`` prints): an op is *prebuilt* when the installed DeepSpeed was built with it for
this accelerator (``DS_BUILD_FUSED_ADAM=1`` … at ``pip install`` time, as the cluster image does), *compatible* when
it can be compiled just in time here (a compiler, ninja, the CUDA toolkit matching torch). Training uses
``fused_adam`` on GPUs and ``cpu_adam`` with optimizer offload. Only flows that train (train, sweep, study) import
DeepSpeed for this report.

The decisions are pure functions of what was observed (:func:`attention_kernel`, :func:`ops_summary`), tested on CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger(__name__)

#: Flows that run DeepSpeed (directly or through a training stage): only they pay for importing it here.
DEEPSPEED_FLOWS = {"train", "sweep", "study"}

#: The ops raysafe's training uses: FusedAdam on GPUs (DeepSpeed's default Adam/AdamW there), CPU Adam with optimizer
#: offload.
TRAINING_OPS = ("fused_adam", "cpu_adam")

#: Compute capability from which FlashAttention kernels run (Ampere).
FLASH_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class AttentionKernel:
    model: str
    asked: str
    used: (
        str  # "eager" | "sdpa/cpu" | "sdpa/flash" | "sdpa/mem_efficient-or-math" | "flash_attention_2" | "unavailable"
    )
    why: str


def attention_kernel(
    model: str,
    asked: str,
    device: str,
    capability: tuple[int, int] | None,
    half_precision: bool,
    flash_attn_version: str | None,
) -> AttentionKernel:
    """The attention kernel ``model`` runs with when its config asks for ``asked`` on ``device`` ("cpu" | "cuda";
    ``capability``: the GPU's compute capability), in bf16/fp16 or not, with ``flash_attn`` installed at that
    version (None: not importable)."""
    flash_ok = device == "cuda" and capability is not None and capability >= FLASH_MIN_CAPABILITY and half_precision
    if asked == "eager":
        return AttentionKernel(model, asked, "eager", "asked for: plain PyTorch attention")
    if asked == "sdpa":
        if device != "cuda":
            return AttentionKernel(model, asked, "sdpa/cpu", "torch SDPA's CPU kernel")
        if flash_ok:
            return AttentionKernel(
                model, asked, "sdpa/flash", f"torch SDPA's FlashAttention kernel (sm{_sm(capability)}, half precision)"
            )
        return AttentionKernel(
            model,
            asked,
            "sdpa/mem_efficient-or-math",
            "torch SDPA without its flash kernel (needs compute capability >= 8.0 and bf16/fp16)",
        )
    # flash_attention_2
    if flash_attn_version is None:
        why = "flash_attn is not installed: the model will not load; build the image with INSTALL_FLASH_ATTN=1 or use sdpa"
    elif device != "cuda":
        why = "FlashAttention 2 runs on CUDA GPUs only: the model will not load here; use sdpa"
    elif capability is None or capability < FLASH_MIN_CAPABILITY:
        why = f"FlashAttention 2 needs compute capability >= 8.0, this GPU is sm{_sm(capability)}; use sdpa"
    elif not half_precision:
        why = "FlashAttention 2 needs bf16/fp16 weights: set the model's dtype to bfloat16 (or auto)"
    else:
        return AttentionKernel(model, asked, "flash_attention_2", f"flash_attn {flash_attn_version}")
    return AttentionKernel(model, asked, "unavailable", why)


def _sm(capability: tuple[int, int] | None) -> str:
    return "?" if capability is None else f"{capability[0]}{capability[1]}"


@dataclass(frozen=True)
class OpStatus:
    name: str
    prebuilt: bool
    compatible: bool


def ops_summary(version: str, accelerator: str, ops: list[OpStatus]) -> str:
    """One line: DeepSpeed's version and accelerator, the training ops' status, then every prebuilt op and every op
    that can be compiled just in time."""
    by_name = {o.name: o for o in ops}

    def state(name: str) -> str:
        o = by_name.get(name)
        if o is None:
            return "absent"
        return "prebuilt" if o.prebuilt else ("JIT-compilable" if o.compatible else "unavailable")

    training = ", ".join(f"{n} {state(n)}" for n in TRAINING_OPS)
    prebuilt = sorted(o.name for o in ops if o.prebuilt) or ["none"]
    jit = sorted(o.name for o in ops if o.compatible and not o.prebuilt) or ["none"]
    return (
        f"DeepSpeed {version} on {accelerator}: {training}; prebuilt ops: {', '.join(prebuilt)}; "
        f"JIT-compilable: {', '.join(jit)}"
    )


# ------------------------------------------------------------------------------------------- observing this process
def flash_attn_version() -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def deepspeed_ops() -> tuple[str, str, list[OpStatus]]:
    """(DeepSpeed version, accelerator name, every op's status), as ``ds_report`` finds them."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name as built_for
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from deepspeed.ops.op_builder.builder import probe_is_compatible

    accelerator = get_accelerator()._name
    ops = [
        OpStatus(name, bool(installed_ops.get(name)) and built_for == accelerator, bool(probe_is_compatible(b, False)))
        for name, b in ALL_OPS.items()
    ]
    return deepspeed.__version__, accelerator, ops


def model_specs(cfg: Any) -> Iterator[Any]:
    """Every :class:`raysafe.config.ModelSpec` inside a flow config (models, references, judges, translators …)."""
    from pydantic import BaseModel

    from raysafe.config import ModelSpec

    if isinstance(cfg, ModelSpec):
        yield cfg
    elif isinstance(cfg, BaseModel):
        for name in type(cfg).model_fields:
            yield from model_specs(getattr(cfg, name))
    elif isinstance(cfg, (list, tuple)):
        for x in cfg:
            yield from model_specs(x)
    elif isinstance(cfg, dict):
        for x in cfg.values():
            yield from model_specs(x)


def kernel_report(flow: str, cfg: Any) -> list[str]:
    """The report's lines for ``flow`` run with ``cfg``, as this process sees its device."""
    import torch

    from raysafe.models.loading import pick_dtype

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    capability = torch.cuda.get_device_capability(0) if on_gpu else None
    fa = flash_attn_version()
    where = f"{torch.cuda.get_device_name(0)} (sm{_sm(capability)})" if on_gpu else "CPU"
    lines = [
        f"kernels on this process's device ({where}); torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
        + f", flash_attn {fa or 'not installed'}"
    ]
    if not on_gpu:
        lines.append(
            "this process sees no GPU: GPU actors and workers of the same image decide on their own devices "
            "(sdpa -> its flash kernel on sm80+ in bf16; flash_attention_2 needs flash_attn and sm80+)"
        )
    seen = set()
    for spec in model_specs(cfg):
        key = (spec.label, spec.attn_implementation, spec.dtype)
        if key in seen:
            continue
        seen.add(key)
        half = pick_dtype(spec, torch.device(device)) in (torch.bfloat16, torch.float16)
        k = attention_kernel(spec.label, spec.attn_implementation, device, capability, half, fa)
        lines.append(f"attention of {k.model}: asked {k.asked} -> {k.used} ({k.why})")
    if flow in DEEPSPEED_FLOWS:
        try:
            lines.append(ops_summary(*deepspeed_ops()))
        except Exception as e:  # an unusable DeepSpeed install is reported here and fails where training starts
            lines.append(f"DeepSpeed ops: cannot be inspected ({type(e).__name__}: {e})")
    return lines


def log_kernel_report(flow: str, cfg: Any) -> list[str]:
    """Log :func:`kernel_report` at job start (a kernel that cannot work as a warning); returns the lines. Never
    raises: the report must not stop a job."""
    try:
        lines = kernel_report(flow, cfg)
    except Exception as e:
        log.warning("kernel check skipped (%s: %s)", type(e).__name__, e)
        return []
    for line in lines:
        (log.warning if "-> unavailable" in line else log.info)("%s", line)
    return lines
