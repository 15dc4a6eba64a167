"""Benchmarks run as scripts (`raysafe bench NAME`), each printing ratios against a baseline measured in the same run."""

from __future__ import annotations

BENCHES = {
    "extract": "raysafe.extract.bench",
    "generate": "raysafe.evaluate.bench",
    "gpu": "raysafe.gpu_check",
    "losses": "raysafe.train.bench_losses",
    "separation": "raysafe.separation.bench",
    "train": "raysafe.train.bench",
    "translate": "raysafe.translate.bench",
    "zero": "raysafe.train.bench_zero",
}


def run_bench(name: str, argv: list[str]) -> int:
    import importlib

    if name not in BENCHES:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(BENCHES)}")
    return importlib.import_module(BENCHES[name]).main(argv)
