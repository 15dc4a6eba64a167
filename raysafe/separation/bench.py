"""Benchmark of the separation analysis: raysafe's torch driver against the same computation with scikit-learn.

Synthetic activations (seeded, planted class structure: English strongly separated, the other languages less and
less, separation growing with depth) of ``--items`` vectors × ``--dim`` dimensions per layer, ``--layers`` layers,
``--languages`` languages, ``--models`` models, are analysed end to end by
:func:`raysafe.separation.tables.analyse_separation` (pooled PCA with ``--k`` components, every metric,
``--resamples`` bootstrap resamples), and by a scikit-learn / numpy baseline doing the same per cell: ``PCA``,
``silhouette_score`` (euclidean and cosine), ``LedoitWolf`` + numpy Bhattacharyya, numpy centroid distance and
between-class variance ratios, ``cross_val_score`` of ``StandardScaler`` + ``LogisticRegression`` on the same folds,
and a loop over the same number of bootstrap resamples. Each side runs in its own process, so its peak RSS is its
own. Time spent generating the synthetic data is measured and left out of both sides.

The baseline is slow, so by default it runs on ``--baseline-layers`` layers and ``--baseline-resamples`` resamples
and is extrapolated linearly (time = point part + per-resample part × resamples, × layers × models); the output says
what was measured and what was extrapolated. Point estimates of the two sides on the measured layers are compared.

    raysafe bench separation # the full-size run (20,000 × 640 × 18 layers × 10 languages)
    raysafe bench separation --items 2000 --layers 3 --languages 3 --resamples 50   # a quick one
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import numpy as np

LANG_CODES = ["en", "ru", "uk", "de", "es", "am", "zh", "ar", "hi", "fr", "it", "ja", "ko", "pt", "tr", "vi"]


# ================================================================================================= data
def language_codes(n: int) -> list[str]:
    """The first ``n`` language codes (English first), padded with l16, l17, ... if more are asked for."""
    return (LANG_CODES + [f"l{i}" for i in range(len(LANG_CODES), n)])[:n]


class SyntheticActivations:
    """A seeded in-memory activation store with planted class structure.

    Each (model, layer) is generated on demand: a shared rank-32 factor structure plus isotropic noise, and for
    each language its toxic items shifted along a language-specific direction by strength(lang) × depth(layer) ×
    (0.25 for model 0, the "base", 1 for the others). ``gen_seconds`` and ``gen_cpu`` accumulate the generation's
    wall and CPU time."""

    def __init__(self, items: int, dim: int, layers: int, languages: int, seed: int):
        self.items, self.dim, self.layers, self.seed = items, dim, layers, seed
        self.langs = language_codes(languages)
        self.gen_seconds = 0.0
        self.gen_cpu = 0.0
        rng = np.random.default_rng([seed, 999])
        self.dirs = rng.standard_normal((len(self.langs), dim)).astype(np.float32)
        self.dirs /= np.linalg.norm(self.dirs, axis=1, keepdims=True)
        self.strength = np.linspace(3.0, 0.3, len(self.langs)).astype(np.float32)
        per = items // len(self.langs)
        self.lang_of = np.repeat(np.arange(len(self.langs)), per)
        self.label = np.tile(np.array([1, 0], dtype=np.int64), len(self.lang_of) // 2 + 1)[: len(self.lang_of)]

    def __call__(self, model: str, layer: int):
        import polars as pl

        t0, c0 = time.perf_counter(), time.process_time()
        m = int(model.split("-")[-1])
        rng = np.random.default_rng([self.seed, m, layer])
        n = len(self.lang_of)
        factors = rng.standard_normal((n, 32), dtype=np.float32)
        loadings = rng.standard_normal((32, self.dim), dtype=np.float32) * 0.6
        X = factors @ loadings
        X += rng.standard_normal((n, self.dim), dtype=np.float32)
        depth = (layer + 1) / self.layers
        scale = self.strength[self.lang_of] * depth * (0.25 if m == 0 else 1.0) * self.label
        X += scale[:, None] * self.dirs[self.lang_of]
        meta = pl.DataFrame(
            {
                "row_id": np.arange(n),
                "group_id": [f"g{i // 2}" for i in range(n)],
                "lang": [self.langs[i] for i in self.lang_of],
                "label": self.label,
            }
        )
        self.gen_seconds += time.perf_counter() - t0
        self.gen_cpu += time.process_time() - c0
        return meta, X


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ================================================================================================ raysafe
def run_raysafe(cfg: dict, queue: mp.Queue) -> None:
    """Child process: the raysafe driver on all models and layers; reports time, peak RSS and the point estimates
    of the baseline layers."""
    import polars as pl
    import torch

    from raysafe.separation.tables import SeparationOptions, analyse_separation

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    store = SyntheticActivations(cfg["items"], cfg["dim"], cfg["layers"], cfg["languages"], cfg["seed"])
    models = [f"model-{i}" for i in range(cfg["models"])]
    # Ledoit-Wolf shrinkage, like the scikit-learn side (the flow's default is the plain closed form)
    opts = SeparationOptions(k=cfg["k"], bootstrap=cfg["resamples"], seed=cfg["seed"], shrinkage="ledoit_wolf")
    rss0 = peak_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    table = analyse_separation(store, models, list(range(cfg["layers"])), opts, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    keep = table.filter(pl.col("layer").is_in(cfg["baseline_layer_ids"]) & (pl.col("model") == models[0]))
    queue.put(
        {
            "wall_s": wall,
            "gen_s": store.gen_seconds,
            "compute_s": wall - store.gen_seconds,
            "compute_cpu_s": cpu - store.gen_cpu,
            "load_avg_end": os.getloadavg()[0],
            "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": rss0,
            "threads": torch.get_num_threads(),
            "statuses": table["status"].value_counts().to_dicts(),
            "points": keep.select("lang", "layer", "metric", "value").to_dicts(),
        }
    )


# ================================================================================================ sklearn
def _bhattacharyya_np(Z0: np.ndarray, Z1: np.ndarray) -> float:
    """Bhattacharyya distance of Ledoit-Wolf Gaussian fits (numpy + scikit-learn)."""
    from sklearn.covariance import LedoitWolf

    c0 = LedoitWolf().fit(Z0).covariance_
    c1 = LedoitWolf().fit(Z1).covariance_
    c = (c0 + c1) / 2
    d = Z1.mean(0) - Z0.mean(0)
    _, ld = np.linalg.slogdet(c)
    _, ld0 = np.linalg.slogdet(c0)
    _, ld1 = np.linalg.slogdet(c1)
    return float(d @ np.linalg.solve(c, d) / 8 + 0.5 * (ld - 0.5 * (ld0 + ld1)))


def _moments_np(Z0: np.ndarray, Z1: np.ndarray) -> tuple[float, float]:
    """(centroid distance / within spread, between-class variance ratio) with numpy."""
    n0, n1 = len(Z0), len(Z1)
    p0, p1 = n0 / (n0 + n1), n1 / (n0 + n1)
    within = p0 * Z0.var(0).sum() + p1 * Z1.var(0).sum()
    gap2 = float(((Z1.mean(0) - Z0.mean(0)) ** 2).sum())
    between = p0 * p1 * gap2
    return math.sqrt(gap2 / within), between / (within + between)


def _cell_sklearn(
    Z: np.ndarray, X: np.ndarray, y: np.ndarray, fold: np.ndarray, idx0: np.ndarray | None, idx1: np.ndarray | None
) -> dict[str, float]:
    """Every metric of one cell with scikit-learn / numpy, on the data or on one stratified resample."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import PredefinedSplit, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Z0, Z1, X0, X1 = Z[y == 0], Z[y == 1], X[y == 0], X[y == 1]
    if idx0 is not None:
        Z0, Z1, X0, X1 = Z0[idx0], Z1[idx1], X0[idx0], X1[idx1]
    Zc = np.concatenate([Z0, Z1])
    yc = np.r_[np.zeros(len(Z0)), np.ones(len(Z1))]
    out = {
        "silhouette_euclidean": float(silhouette_score(Zc, yc, metric="euclidean")),
        "silhouette_cosine": float(silhouette_score(Zc, yc, metric="cosine")),
        "bhattacharyya": _bhattacharyya_np(Z0, Z1),
    }
    out["centroid_distance"], out["between_var_ratio"] = _moments_np(Z0, Z1)
    _, out["between_var_ratio_full"] = _moments_np(X0.astype(np.float64), X1.astype(np.float64))
    if idx0 is None:
        acc = cross_val_score(
            make_pipeline(StandardScaler(), LogisticRegression(C=1.0)), Z, y, cv=PredefinedSplit(fold)
        )
        out["probe_accuracy"] = float(np.average(acc, weights=np.bincount(fold)))
        Xf = X.astype(np.float64)
        out["pca_explained_variance"] = float(Z.var(0).sum() / Xf.var(0).sum())
    return out


def run_sklearn(cfg: dict, queue: mp.Queue) -> None:
    """Child process: the scikit-learn baseline on the baseline layers of the first model, point estimates and
    ``baseline_resamples`` resamples per cell, timed separately."""
    import torch
    from sklearn.decomposition import PCA

    from raysafe.separation.metrics import stratified_folds
    from raysafe.separation.tables import cell_seed

    if cfg["threads"]:  # the same thread budget as the torch side, for numpy/scipy BLAS and OpenMP
        from threadpoolctl import threadpool_limits

        threadpool_limits(cfg["threads"])
    store = SyntheticActivations(cfg["items"], cfg["dim"], cfg["layers"], cfg["languages"], cfg["seed"])
    point_s = boot_s = point_cpu = boot_cpu = 0.0
    points = []
    for layer in cfg["baseline_layer_ids"]:
        meta, X = store("model-0", layer)
        t0, c0 = time.perf_counter(), time.process_time()
        Z_all = PCA(cfg["k"], random_state=cfg["seed"]).fit_transform(X).astype(np.float64)
        point_s += time.perf_counter() - t0
        point_cpu += time.process_time() - c0
        langs = meta["lang"].to_numpy()
        labels = meta["label"].to_numpy()
        for lg in store.langs:
            sel = langs == lg
            Z, Xl, y = Z_all[sel], X[sel], labels[sel]
            seed = cell_seed(cfg["seed"], lg, layer)
            fold = stratified_folds(torch.tensor(y), 5, torch.Generator().manual_seed(seed)).numpy()
            t0, c0 = time.perf_counter(), time.process_time()
            vals = _cell_sklearn(Z, Xl, y, fold, None, None)
            point_s += time.perf_counter() - t0
            point_cpu += time.process_time() - c0
            points += [{"lang": lg, "layer": layer, "metric": m, "value": v} for m, v in vals.items()]
            rng = np.random.default_rng(seed)
            n0, n1 = int((y == 0).sum()), int((y == 1).sum())
            t0, c0 = time.perf_counter(), time.process_time()
            reps = [
                _cell_sklearn(Z, Xl, y, fold, rng.integers(0, n0, n0), rng.integers(0, n1, n1))
                for _ in range(cfg["baseline_resamples"])
            ]
            for m in reps[0] if reps else []:
                np.percentile([r[m] for r in reps], [2.5, 97.5])
            boot_s += time.perf_counter() - t0
            boot_cpu += time.process_time() - c0
    queue.put(
        {
            "point_s": point_s,
            "boot_s": boot_s,
            "point_cpu_s": point_cpu,
            "boot_cpu_s": boot_cpu,
            "peak_rss_mib": peak_rss_mib(),
            "points": points,
            "gen_s": store.gen_seconds,
            "load_avg_end": os.getloadavg()[0],
        }
    )


def _in_child(target, cfg: dict) -> dict:
    """Run ``target(cfg, queue)`` in a fresh process and return what it reports."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(cfg, q))
    p.start()
    result = q.get()
    p.join()
    return result


# =================================================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("--items", type=int, default=20_000, help="vectors per model and layer, all languages together")
    ap.add_argument("--dim", type=int, default=640, help="hidden size")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--languages", type=int, default=10)
    ap.add_argument("--models", type=int, default=1, help="models analysed (model-0 is the 'base')")
    ap.add_argument("--k", type=int, default=10, help="PCA components")
    ap.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per cell")
    ap.add_argument("--baseline-layers", type=int, default=1, help="layers the scikit-learn baseline really runs")
    ap.add_argument(
        "--baseline-resamples",
        type=int,
        default=10,
        help="resamples the baseline really runs per cell (its time is extrapolated to --resamples)",
    )
    ap.add_argument("--skip-point-only", action="store_true", help="do not also time raysafe without bootstrap")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads, and BLAS/OpenMP threads of the baseline (0: the libraries' defaults)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    n_baseline = max(1, min(a.baseline_layers, a.layers))
    cfg = dict(
        items=a.items,
        dim=a.dim,
        layers=a.layers,
        languages=a.languages,
        models=a.models,
        k=a.k,
        resamples=a.resamples,
        seed=a.seed,
        threads=a.threads,
        baseline_layer_ids=[round(i * (a.layers - 1) / max(1, n_baseline - 1)) for i in range(n_baseline)]
        if n_baseline > 1
        else [a.layers - 1],
        baseline_resamples=a.baseline_resamples,
    )
    cells = a.models * a.layers * a.languages
    print(
        f"workload: {a.models} model(s) × {a.layers} layers × {a.languages} languages = {cells} cells; "
        f"{a.items} vectors × {a.dim} dims per model and layer ({a.items // a.languages} per language); "
        f"k = {a.k}; {a.resamples} bootstrap resamples per cell"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average before start {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}"
    )
    res: dict = {"config": cfg}
    full = _in_child(run_raysafe, cfg)
    res["raysafe"] = full
    print(
        f"raysafe  (torch, {full['threads']} threads, bootstrap {a.resamples}): compute {full['compute_s']:.1f} s "
        f"(+ {full['gen_s']:.1f} s generating data), CPU time {full['compute_cpu_s']:.1f} s, peak RSS "
        f"{full['peak_rss_mib']:.0f} MiB; statuses {full['statuses']}"
    )
    if not a.skip_point_only:
        pt = _in_child(run_raysafe, {**cfg, "resamples": 0})
        res["raysafe_point_only"] = pt
        print(
            f"raysafe  (no bootstrap): compute {pt['compute_s']:.1f} s, CPU time {pt['compute_cpu_s']:.1f} s, "
            f"peak RSS {pt['peak_rss_mib']:.0f} MiB"
        )
    if not a.skip_baseline:
        sk = _in_child(run_sklearn, cfg)
        per_layer_point = sk["point_s"] / n_baseline
        per_layer_boot = sk["boot_s"] / n_baseline / max(1, a.baseline_resamples) * a.resamples
        est_point = per_layer_point * a.layers * a.models
        est_full = (per_layer_point + per_layer_boot) * a.layers * a.models
        cpu_full = (
            (sk["point_cpu_s"] + sk["boot_cpu_s"] / max(1, a.baseline_resamples) * a.resamples)
            / n_baseline
            * a.layers
            * a.models
        )
        res["sklearn"] = {
            **sk,
            "extrapolated_point_s": est_point,
            "extrapolated_full_s": est_full,
            "extrapolated_full_cpu_s": cpu_full,
        }
        print(
            f"sklearn  measured: {n_baseline} layer(s) {cfg['baseline_layer_ids']} of 1 model, point estimates "
            f"{sk['point_s']:.1f} s, {a.baseline_resamples} resamples/cell {sk['boot_s']:.1f} s; "
            f"peak RSS {sk['peak_rss_mib']:.0f} MiB"
        )
        print(
            f"sklearn  extrapolated linearly to {a.models} model(s) × {a.layers} layers and {a.resamples} "
            f"resamples: {est_full:.0f} s ({est_point:.0f} s of it point estimates); CPU time {cpu_full:.0f} s"
        )
        print(
            f"speed-up with bootstrap ({a.resamples} resamples): {est_full / full['compute_s']:.1f}× in wall "
            f"time, {cpu_full / full['compute_cpu_s']:.1f}× in CPU time (robust to other load on the machine)"
        )
        if not a.skip_point_only:
            print(f"speed-up, point estimates only: {est_point / res['raysafe_point_only']['compute_s']:.1f}×")
        ours = {(p["lang"], p["layer"], p["metric"]): p["value"] for p in full["points"]}
        diffs: dict[str, float] = {}
        for p in sk["points"]:
            v = ours.get((p["lang"], p["layer"], p["metric"]))
            if v is not None:
                diffs[p["metric"]] = max(diffs.get(p["metric"], 0.0), abs(v - p["value"]))
        res["max_abs_diff"] = diffs
        print(
            "agreement of point estimates (max |raysafe − sklearn| over the measured cells): "
            + ", ".join(f"{m} {d:.1e}" for m, d in diffs.items())
        )
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
