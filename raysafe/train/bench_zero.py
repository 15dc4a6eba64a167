"""`raysafe bench zero`: memory per worker at load and in the first training step, ZeRO-0/2/3, N Ray Train workers.

The claim it checks (issue 22 item 1): under ZeRO-3 the policy is partitioned while it is built
(``raysafe.train.worker.load_models`` → transformers' ``HfDeepSpeedConfig`` → ``deepspeed.zero.Init``), so the
memory a worker holds after loading is ≈ 1/N of ZeRO-0's plus a constant, instead of the whole model.

Each stage runs ``TorchTrainer`` with N workers (``--workers``, CPU) over the same code path as training: the
DeepSpeed config of ``raysafe.train.ds_config``, ``raysafe.train.worker.load_models`` (the policy and, with
``--reference``, the on-worker reference model), ``AlignModule`` + AdamW + ``deepspeed.initialize``, then one
optimiser step of SimPO (no reference needed) on one collated micro-batch of the bundled pairs (with
``--reference``, preceded by the reference model's forward on it, whose log-probs must agree across stages). No
checkpoint is written. Per worker it records:

- the parameter elements the worker holds after load (ZeRO-3: the sizes of its ``ds_tensor`` partitions; else the
  full tensors) — exact, independent of the allocator;
- ``load Δ``: RSS after loading − RSS before (libraries already imported) — what the worker keeps;
- ``load peak Δ``: peak RSS while loading − RSS before (``/proc/self/clear_refs`` resets the peak). Under ZeRO-3,
  transformers reads the whole checkpoint on rank 0 (to copy each layer into the partitions), so rank 0's load
  peak includes one full copy of the weights in CPU memory — CPU memory, not accelerator memory, on a GPU cluster;
- ``step peak Δ``: peak RSS during ``deepspeed.initialize`` + the first step − RSS before loading.

glibc's mmap threshold is fixed at 1 MiB in the workers so freed tensors return to the OS and RSS follows the live
tensors. RSS also counts activations, DeepSpeed's buckets and allocator slack, which is why the claim is stated
as ratio + constant. The model is a random Llama built in-process (``--hidden``, ``--layers``, ``--vocab``;
float32, saved once to a temporary directory), big enough that parameters dominate.

Example::

    raysafe bench zero                                  # ~146M parameters, 2 workers, ZeRO 0 2 3
    raysafe bench zero --hidden 2048 --layers 16        # ~670M parameters (ZeRO-0 step: ~11 GB per worker)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from raysafe.train.bench import _status_kib  # /proc/self/status fields, the training bench's reader


def _rss_mb() -> float:
    return _status_kib("VmRSS:") / 1024


def _peak_mb() -> float:
    return _status_kib("VmHWM:") / 1024


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _held_elements(module) -> int:
    """Parameter elements this process holds: ZeRO-3 partitions (``ds_tensor``) or whole tensors."""
    total = 0
    for p in module.parameters():
        total += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return total


def _touch(module) -> None:
    """Read every parameter byte this process holds (its ZeRO-3 partition, or the whole tensor)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            (p.ds_tensor if hasattr(p, "ds_tensor") else p).float().sum()


def measure_worker(config: dict) -> None:
    """One Ray Train worker: load (measured), ``deepspeed.initialize`` + one step (measured); JSON per rank."""
    import ctypes

    import deepspeed
    import ray.train
    import torch
    import transformers  # noqa: F401  (imported before the baseline, as the worker loop has it)

    from raysafe.train.config import TrainConfig
    from raysafe.train.data import load_samples, to_collator_samples
    from raysafe.train.ds_config import deepspeed_config
    from raysafe.train.worker import AlignModule, load_models, make_collator, param_groups

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except OSError:
        pass
    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    device = torch.device("cpu")
    samples = load_samples(cfg.data, cfg.mixture, cfg.seed).head(cfg.optim.micro_batch)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.optim, on_gpu=False)

    before = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    policy, tok, reference, _ref_engine = load_models(cfg, device, ds_cfg, config["reference"])
    load_s = time.perf_counter() - t0
    after_load, load_peak = _rss_mb(), _peak_mb()
    held = _held_elements(policy) + (_held_elements(reference) if reference is not None else 0)
    _touch(policy)  # the first forward reads every weight: mmap-ed checkpoint pages become resident then
    if reference is not None:
        _touch(reference)
    after_touch = _rss_mb()

    _reset_peak()
    module = AlignModule(policy, None, cfg, None)
    optimizer = torch.optim.AdamW(param_groups(module, cfg), lr=cfg.optim.lr)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg, dist_init_required=False)
    batch = make_collator(cfg, tok)(to_collator_samples({c: samples[c].to_list() for c in samples.columns}))
    t0 = time.perf_counter()
    ref = None
    if reference is not None:  # the reference forward (ZeRO-3: gathered layer by layer by its inference engine)
        from raysafe.train.forward import policy_forward

        with torch.no_grad():
            ref = policy_forward(reference, batch, None)
    loss, _ = engine(batch, None, None, False)
    engine.backward(loss)
    engine.step()
    step_s = time.perf_counter() - t0
    out = {
        "rank": rank,
        "before_mb": before,
        "load_delta_mb": after_load - before,
        "touched_delta_mb": after_touch - before,
        "load_peak_delta_mb": load_peak - before,
        "step_peak_delta_mb": _peak_mb() - before,
        "held_param_elements": held,
        "load_s": load_s,
        "step_s": step_s,
        "loss": float(loss),
        "ref_chosen_logps": ref.chosen_logps.tolist() if ref is not None else None,
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))
    ray.train.report({"loss": float(loss)})


def _config(args, model_dir: Path, stage: int, storage: Path):
    from raysafe.train.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"path": str(model_dir), "name": "bench-llama"},
            "data": {"max_length": args.max_length, "max_prompt_length": args.max_length * 3 // 4},
            "loss": {"name": "simpo"},
            "mlc": {"weight": 0.0},
            "optim": {"lr": 1e-5, "micro_batch": 1, "grad_accum": 1},
            "deepspeed": {"zero_stage": stage, "reduce_bucket_size": args.bucket, "prefetch_bucket_size": args.bucket},
            "checkpoint": {"storage_path": str(storage)},
            "ray": {"num_workers": args.workers, "torch_threads": 1},
            "tracking": {"enabled": False},
        }
    )


def _measure_stage(args, model_dir: Path, work: Path, stage: int) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysafe.errors import remote_errors

    out = work / f"zero{stage}"
    out.mkdir()
    cfg = _config(args, model_dir, stage, out)
    trainer = TorchTrainer(
        measure_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": str(out), "reference": args.reference},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-zero{stage}", storage_path=str(out / "ray")),
    )
    with remote_errors():
        trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.workers)]


def build_model(args, work: Path) -> tuple[Path, int]:
    """A random float32 Llama of the requested size with the byte-level test tokenizer; (directory, Ψ)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raysafe.models.tiny import save_tiny, tiny_config

    size = {"hidden": args.hidden, "num_layers": args.layers, "vocab_size": args.vocab}
    with torch.device("meta"):
        psi = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny_config("llama", **size)).parameters())
    return save_tiny(work / "model", "llama", **size), psi


def print_table(report: dict) -> None:
    psi, n = report["params"], report["workers"]
    print(
        f"\nZeRO memory per worker: random Llama, Ψ = {psi / 1e6:.1f} M parameters (float32: {4 * psi / 2**20:.0f} MiB), "
        f"{n} CPU Ray Train workers, SimPO, max_length {report['max_length']}"
        + (", + on-worker reference model" if report["reference"] else "")
    )
    print(
        f"{'ZeRO':<6}{'held params/worker':>22}{'load Δ':>14}{'load+read Δ':>16}{'load peak Δ':>16}{'step peak Δ':>16}"
        f"{'load s':>14}{'step s':>14}"
    )
    for stage, ws in report["stages"].items():

        def col(key, fmt="{:.0f}", ws=ws):
            return " | ".join(fmt.format(w[key]) for w in ws)

        held = " | ".join(f"{w['held_param_elements'] / 1e6:.1f}M" for w in ws)
        print(
            f"{stage:<6}{held:>22}{col('load_delta_mb'):>14}{col('touched_delta_mb'):>16}{col('load_peak_delta_mb'):>16}"
            f"{col('step_peak_delta_mb'):>16}{col('load_s', '{:.1f}'):>14}{col('step_s', '{:.1f}'):>14}"
        )
    print(
        "  (MiB, rank 0 | rank 1 ...; Δ = against the worker's RSS before loading, libraries imported; load+read Δ: "
        "after reading every held parameter once)"
    )
    refs = [w["ref_chosen_logps"] for ws in report["stages"].values() for w in ws if w.get("ref_chosen_logps")]
    if refs:
        diff = max(abs(a - b) for r in refs for a, b in zip(r, refs[0]))
        print(
            f"  reference log-probs, every stage and rank against ZeRO-{next(iter(report['stages']))} rank 0: max |Δ| {diff:.2e}"
        )
    stages = report["stages"]
    if "0" in stages and "3" in stages:
        for r, (a, b) in enumerate(zip(stages["0"], stages["3"])):
            z0, z3 = a["touched_delta_mb"], b["touched_delta_mb"]
            print(
                f"  rank {r}: load+read Δ ZeRO-3 / ZeRO-0 = {z3 / z0:.3f} (1/N = {1 / n:.3f}); "
                f"constant = ZeRO-3 − ZeRO-0/N = {z3 - z0 / n:.0f} MiB; held parameters ratio "
                f"{b['held_param_elements'] / a['held_param_elements']:.3f}"
            )


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="raysafe bench zero",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--bucket", type=int, default=5_000_000, help="DeepSpeed reduce/prefetch bucket elements")
    p.add_argument("--reference", action="store_true", help="also load the on-worker reference model")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import os

    import ray

    from raysafe.train.ds_config import prepare_cpu_comm

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    work = Path(tempfile.mkdtemp(prefix="raysafe-bench-zero-"))
    try:
        model_dir, psi = build_model(args, work)
        print(f"model: {psi / 1e6:.1f} M parameters in {model_dir}", file=sys.stderr, flush=True)
        prepare_cpu_comm()
        ray.init(num_cpus=args.workers, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
        stages = {}
        for stage in args.stages:
            t0 = time.perf_counter()
            stages[str(stage)] = _measure_stage(args, model_dir, work, stage)
            print(f"  ZeRO-{stage}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        report = {
            "params": psi,
            "workers": args.workers,
            "max_length": args.max_length,
            "reference": args.reference,
            "stages": stages,
            "load_average": os.getloadavg(),
        }
        print_table(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
