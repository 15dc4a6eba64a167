"""DeepSpeed configuration from ours, and the check that it can run on the hardware at hand.

``check_hardware`` runs in the driver before any worker starts, so an impossible combination (bf16 on a CPU, offload
without the CPU Adam op, parameter offload below ZeRO-3, ...) fails at once with the reason.
"""

from __future__ import annotations

import logging
import math

import torch

from raysafe.errors import ConfigError
from raysafe.train.config import DeepSpeedSpec, OptimSpec


def use_bf16(spec: DeepSpeedSpec, on_gpu: bool) -> bool:
    return spec.precision == "bf16" or (spec.precision == "auto" and on_gpu)


def check_hardware(spec: DeepSpeedSpec, on_gpu: bool, lora: bool) -> None:
    """Raise ConfigError for ZeRO/offload/precision settings that cannot work on this hardware."""
    where = "deepspeed"
    if spec.offload_params and spec.zero_stage != 3:
        raise ConfigError(
            f"parameter offload needs ZeRO stage 3, got stage {spec.zero_stage}",
            where=f"{where}.offload_params",
            fix="set deepspeed.zero_stage=3 or deepspeed.offload_params=false",
        )
    if (spec.offload_optimizer or spec.offload_params) and spec.zero_stage == 0:
        raise ConfigError(
            "offload needs ZeRO stage >= 1", where=f"{where}.offload_optimizer", fix="raise deepspeed.zero_stage"
        )
    if (spec.offload_optimizer or spec.offload_params) and not on_gpu:
        raise ConfigError(
            "offload moves state from GPU to CPU memory; these workers run on the CPU already",
            where=f"{where}.offload_optimizer / offload_params",
            fix="turn offload off on CPU workers, or set ray.use_gpu=true on a GPU cluster",
        )
    if spec.precision == "bf16" and not on_gpu:
        raise ConfigError(
            "bf16 training is set but the workers have no GPU",
            where=f"{where}.precision",
            fix="use precision auto or fp32 on CPU workers",
        )
    if on_gpu and spec.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16", where=f"{where}.precision", fix="use precision fp32")
    if lora and spec.offload_optimizer:
        # LoRA trains only the adapters: their Adam state is a fraction of a percent of the model's, so moving it to
        # the CPU frees next to nothing and costs a host round trip (and CPU Adam) every step
        logging.getLogger(__name__).warning(
            "deepspeed.offload_optimizer with LoRA: the optimiser holds only the adapters' state (small); offload "
            "saves little memory and slows every step. Parameter offload (ZeRO-3, offload_params) is what moves the "
            "frozen base weights"
        )
    if spec.offload_optimizer:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        if not CPUAdamBuilder().is_compatible(verbose=False):
            raise ConfigError(
                "optimizer offload needs DeepSpeed's CPU Adam op, which cannot be built here",
                where=f"{where}.offload_optimizer",
                fix="install a compiler toolchain, or turn offload off",
            )


def deepspeed_config(spec: DeepSpeedSpec, optim: OptimSpec, on_gpu: bool) -> dict:
    """The DeepSpeed JSON config (micro-batch per worker, accumulation, clipping, ZeRO stage, precision, offload)."""
    zero: dict = {"stage": spec.zero_stage}
    if spec.zero_stage >= 2:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=spec.reduce_bucket_size)
    if spec.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold=1e4,
            stage3_prefetch_bucket_size=spec.prefetch_bucket_size,
        )
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": optim.micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(spec, on_gpu)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float, warmup_shape: str = "hf"):
    """Multiplier of the base learning rate at optimiser step s: linear warm-up over ``w = ⌈warmup_ratio · total⌉``
    steps, then cosine/linear decay to 0 (or constant).

    ``warmup_shape="hf"``: ``s / w`` during warm-up, the same values as transformers' ``get_cosine_schedule_with_warmup``
    / ``get_linear_schedule_with_warmup`` with ``TrainingArguments.get_warmup_steps`` — the scheduler of the MLC release
    (LLaMA-Factory's ``CustomDPOTrainer.create_scheduler`` → ``Trainer.create_scheduler``). ``"shifted"``: ``(s + 1) / w``.
    """
    warmup = int(math.ceil(warmup_ratio * total_steps))
    if warmup_shape not in ("hf", "shifted"):
        raise ConfigError(
            f"unknown warm-up shape {warmup_shape!r}", where="optim.warmup_shape", fix="use hf or shifted"
        )
    shift = 1 if warmup_shape == "shifted" else 0

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + shift) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def prepare_cpu_comm(stale_after_s: float = 900.0) -> None:
    """Build DeepSpeed's CPU shared-memory comm op once in the driver, before CPU workers start.

    Without this every CPU worker JIT-compiles ``deepspeed_shm_comm`` on first use (1-2 min) and they race for the
    build lock; a build that was killed leaves its ``lock`` file behind and every later run then waits on it forever.
    A lock older than ``stale_after_s`` with no built library is removed (with a warning) before building.
    """
    import logging
    import os
    import time

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    log = logging.getLogger(__name__)
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    build_dir = _get_build_directory(builder.NAME, verbose=False)
    lock = os.path.join(build_dir, "lock")
    built = os.path.exists(os.path.join(build_dir, f"{builder.NAME}.so"))
    if os.path.exists(lock) and not built and time.time() - os.path.getmtime(lock) > stale_after_s:
        log.warning("removing a stale DeepSpeed build lock left by an interrupted build: %s", lock)
        os.remove(lock)
    if not built:
        log.info("building DeepSpeed's CPU comm op %s once (1-2 minutes; cached in %s)", builder.NAME, build_dir)
    builder.load(verbose=False)
