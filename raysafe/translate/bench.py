"""`raysafe bench translate`: sentences/s of the translation actor pool against a plain loop, in one run.

Both sides do the same work with the same code (``translate_cell``: translate, back-translate, language ID, chrF,
length ratio, one Parquet file + marker per cell) over the same (language, shard) cells of the bundled English
safety prompts:

1. plain loop: one ``Seq2SeqTranslator`` in this process (all torch threads), cell after cell; timed with its model
   load, as the pool's time includes its actors' start-up;
2. the pipeline (``run_translate``: Ray Data, ``--actors`` translator actors of ``--threads / --actors`` threads each);
   Ray itself is started before the clock.

A sentence is one text translated (forward or back). Without ``--model`` the model is a random multi-target Marian
model of the given size built in a temporary directory (no MT model is available offline here), its special tokens
biased away so that every output is exactly ``--max-new-tokens`` tokens of text: each text is translated and
back-translated, and both sides do identical work. With ``--model`` (a local NLLB/M2M100/
Marian directory or a hub id) the figures are those of that model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def plain_loop(cfg, store_root: Path, threads: int) -> tuple[float, int]:
    """(seconds, sentences) of the cells translated in this process, one after the other."""
    import torch

    from raysafe.translate.flow import FIELDS, contract_of, source_rows
    from raysafe.translate.quality import make_identifier
    from raysafe.translate.stages import translate_cell
    from raysafe.translate.store import TranslationStore
    from raysafe.translate.translators import make_translator

    contract = contract_of(cfg)
    rows = source_rows(cfg, contract)
    store = TranslationStore(store_root)
    n_shards = store.write_inputs(rows, cfg.translate.shard_rows, "bench")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    translator = make_translator(cfg.translator, None, threads)
    identifier = make_identifier(cfg.quality.langid)
    sentences = 0
    for lang in cfg.translate.target_langs:
        for k in range(n_shards):
            s = translate_cell(
                translator, identifier, store, k, lang, cfg.translate.source_lang, FIELDS[contract],
                cfg.quality.round_trip,
            )  # fmt: skip
            sentences += s["sentences"]
    return time.perf_counter() - t0, sentences


def _bench_model(args, work: Path) -> str:
    """``--model``, or a random Marian model with the target-language codes saved under ``work``."""
    if args.model is not None:
        return args.model
    from raysafe.models.tiny import save_tiny_mt
    from raysafe.translate.codes import NLLB

    codes = [f">>{NLLB[c][:3]}<<" for c in ("en", *args.langs.split(","))]
    return str(save_tiny_mt(work / "mt", "marian", codes, d_model=args.d_model, layers=args.layers, never_stop=True))


def _bench_config(args, model: str, output_dir: Path, actors: int, threads: int):
    """The TranslateConfig of one measured run (a flat list of settings)."""
    from raysafe.config import load_config
    from raysafe.translate.config import TranslateConfig

    return load_config(
        TranslateConfig,
        data={
            "data": {"kind": "fixture", "name": "safety_prompts", "languages": ["en"], "limit_per_lang": args.rows},
            "translator": {
                "kind": "seq2seq",
                "model": {"path": model, "name": "bench-mt"},
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
            },
            "translate": {"target_langs": args.langs.split(","), "shard_rows": args.shard_rows},
            "quality": {"langid": "langid", "round_trip": True},
            "output_dir": str(output_dir),
            "ray": {"num_actors": actors, "num_cpus_per_actor": 1, "torch_threads": threads},
            "tracking": {"enabled": False},
        },
    )


def run(args) -> dict:
    from raysafe.translate.flow import run_translate

    work = Path(tempfile.mkdtemp(prefix="raysafe-bench-translate-"))
    model = _bench_model(args, work)
    threads_per_actor = max(1, args.threads // args.actors)

    import ray

    from raysafe.runtime import ensure_ray

    ensure_ray(_bench_config(args, model, work / "pool", args.actors, threads_per_actor).ray)
    loop_s, loop_n = plain_loop(_bench_config(args, model, work / "loop", 1, args.threads), work / "loop", args.threads)
    res = run_translate(_bench_config(args, model, work / "pool", args.actors, threads_per_actor), progress=False)
    ray.shutdown()
    out = {
        "model": args.model or f"random Marian d_model={args.d_model} layers={args.layers}",
        "rows": args.rows,
        "langs": args.langs,
        "cells": res.cells_total,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "actors": args.actors,
        "plain_loop": {"seconds": round(loop_s, 2), "sentences": loop_n, "sentences_per_s": round(loop_n / loop_s, 2)},
        "actor_pool": {
            "seconds": round(res.seconds, 2),
            "sentences": res.sentences,
            "sentences_per_s": round(res.sentences_per_s, 2),
        },
    }
    out["pool_over_loop"] = round(out["actor_pool"]["sentences_per_s"] / out["plain_loop"]["sentences_per_s"], 3)
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="raysafe bench translate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="MT model directory or hub id (default: a random Marian model)")
    p.add_argument("--d-model", type=int, default=256, help="width of the random model")
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers of the random model")
    p.add_argument("--rows", type=int, default=40, help="English source prompts (at most 120)")
    p.add_argument("--langs", default="zh,ru", help="target languages")
    p.add_argument("--shard-rows", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads in all (loop; pool total)")
    p.add_argument("--actors", type=int, default=2, help="translator actors in the pool")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
