"""`raysafe bench generate`: generations/s and tokens/s of the generation backends (``hf``, ``vllm``) in one run.

Each backend runs exactly the code path of ``raysafe evaluate`` (``flow._generate``: hf's actor pool of
``ModelWorkerStage``; vllm's Ray Data LLM stage) on the same model, prompts and sampling (greedy, the same
``max_new_tokens``, EOS ends a response), writing its generation shards into its own store in a temporary directory.
Prompts: the bundled multilingual safety prompts, repeated to ``--prompts``. The clock runs from the start of the
backend's stage to its last shard written, so it includes model loading / engine start-up (Ray is started before).
A new token is one of ``n_new_tokens`` (EOS excluded). One line of figures per backend, then the ratio to the first
backend, and how many responses are identical between the backends.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _prompts(n: int):
    """``n`` prompt rows: the bundled safety prompts (every language), repeated."""
    import polars as pl

    from raysafe.evaluate.config import _default_sets
    from raysafe.evaluate.data import load_prompts

    base = load_prompts(_default_sets())
    reps = -(-n // base.height)
    df = pl.concat([base] * reps).head(n)
    return df.drop("row_id").with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64))


def run_backend(backend: str, args, prompts, work: Path) -> dict:
    """Generate every prompt with ``backend``; returns its figures and responses."""
    from raysafe.atomic import write_inputs
    from raysafe.evaluate.config import EvaluateConfig, model_label
    from raysafe.evaluate.flow import _generate, _Inputs, check_generation_backend
    from raysafe.evaluate.store import EvalStore

    gpus = args.gpus if args.gpus is not None else _default_gpus()
    cfg = EvaluateConfig.model_validate(
        {
            "models": [{"path": args.model, "dtype": args.dtype}],
            "generation": {
                "backend": backend,
                "max_new_tokens": args.max_new_tokens,
                "max_prompt_tokens": args.max_prompt_tokens,
                "batch_size": args.batch_size,
                "shard_rows": args.shard_rows,
                "vllm": {
                    "gpu_memory_utilization": args.gpu_memory_utilization,
                    "enforce_eager": args.enforce_eager,
                    "batch_size": args.shard_rows,
                },
            },
            "utility": {"enabled": False},
            "output_dir": str(work / backend),
            "ray": {
                "num_actors": 1,
                "num_gpus_per_actor": gpus,
                "num_cpus_per_actor": args.cpus,
                "torch_threads": args.threads,
            },
        }
    )
    check_generation_backend(cfg.generation)
    store = EvalStore(cfg.output_dir)
    spec = cfg.models[0]
    n = write_inputs(store.prompts.root, prompts, cfg.generation.shard_rows, "bench", "prompts")
    inputs = _Inputs(prompts, [], "bench", None, [], None, n_prompt_shards=n)
    t0 = time.perf_counter()
    _generate(cfg, store, spec, inputs, progress=False)
    seconds = time.perf_counter() - t0
    gens = store.generations(model_label(spec)).read(n).sort("row_id")
    tokens = int(gens["n_new_tokens"].sum())
    return {
        "backend": backend,
        "generations": gens.height,
        "new_tokens": tokens,
        "seconds": seconds,
        "generations_per_s": gens.height / seconds,
        "tokens_per_s": tokens / seconds,
        "finish_reasons": {k: int(v) for k, v in gens["finish_reason"].value_counts().iter_rows()},
        "responses": gens["response"].to_list(),
    }


def _default_gpus() -> float:
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="raysafe bench generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="hf,vllm", help="comma-separated backends, the first is the baseline")
    ap.add_argument("--model", default="gemma3-270m", help="'gemma3-270m', a local HF directory or a hub id")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=64, help="hf: prompts per generate call")
    ap.add_argument("--shard-rows", type=int, default=64, help="prompts per shard (and per vllm Ray Data batch)")
    ap.add_argument("--gpus", type=float, default=None, help="GPUs per actor/engine (default: 1 if CUDA, else 0)")
    ap.add_argument("--cpus", type=float, default=1.0, help="CPUs per actor/engine")
    ap.add_argument("--threads", type=int, default=None, help="hf: torch threads per actor")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm (CPU build: share of host RAM)")
    ap.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--workdir", help="keep the stores here (default: a temporary directory)")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("hf", "vllm")]
    if bad or not backends:
        ap.error(f"--backend takes hf and/or vllm, got {args.backend!r}")

    from raysafe.config import RaySpec
    from raysafe.evaluate.flow import check_generation_backend
    from raysafe.runtime import ensure_ray

    for b in backends:  # every backend can run here, before the first one is timed
        check_generation_backend({"backend": b})
    ensure_ray(RaySpec())
    prompts = _prompts(args.prompts)
    results = []
    with tempfile.TemporaryDirectory(prefix="raysafe-bench-generate-") as tmp:
        work = Path(args.workdir or tmp)
        for b in backends:
            r = run_backend(b, args, prompts, work)
            results.append(r)
            print(
                f"{b}: {r['generations']} generations, {r['new_tokens']} new tokens in {r['seconds']:.1f} s: "
                f"{r['generations_per_s']:.2f} generations/s, {r['tokens_per_s']:.1f} tokens/s "
                f"(finish reasons {r['finish_reasons']})",
                flush=True,
            )
    base = results[0]
    for r in results[1:]:
        same = sum(a == b for a, b in zip(base["responses"], r["responses"]))
        print(
            f"{r['backend']}/{base['backend']}: {r['generations_per_s'] / base['generations_per_s']:.2f}x generations/s, "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s; identical responses {same}/{len(r['responses'])}"
        )
    if args.json:
        summary = {
            "model": args.model,
            "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype,
            "results": [{k: v for k, v in r.items() if k != "responses"} for r in results],
        }
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0
