"""Bootstrap intervals over items: seeded resamples shared by the models they compare (a paired bootstrap), percentile
intervals, and the paired difference of per-language rates. Pure numpy; the measures that use them live with their
data (``raysafe.consistency``, the study's report)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] item indices drawn with replacement; the same seed gives the same draws, so two models
    measured on the same items share their resamples (a paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates left out)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    q = (1 - level) / 2
    return float(np.quantile(r, q)), float(np.quantile(r, 1 - q))


def rate_replicates(outcomes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per-language rates on each resample of groups: ``outcomes [L, G]`` (1, 0 or NaN where a language has no
    outcome for a group), ``idx [R, G]`` resampled group indices → ``[L, R]`` (NaN where a resample drew no outcome)."""
    x = np.asarray(outcomes, dtype=np.float64)[:, idx]  # [L, R, G]
    n = (~np.isnan(x)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(x, -1) / np.where(n > 0, n, 1), np.nan)


def paired_rate_differences(
    a: np.ndarray, b: np.ndarray, langs: Sequence[str], *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict]:
    """Rate of ``a`` minus rate of ``b`` per language, the two ``[L, G]`` outcome matrices on the same groups,
    with the percentile interval of the difference over resamples of the groups shared by both (paired), and
    ``excludes_zero`` when that interval lies wholly on one side of 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.shape[0] != len(langs):
        raise ValueError(f"outcome matrices {a.shape} and {b.shape} do not match {len(langs)} languages")
    idx = bootstrap_indices(a.shape[1], resamples, seed)
    full = np.arange(a.shape[1])[None, :]
    point = rate_replicates(a, full)[:, 0] - rate_replicates(b, full)[:, 0]
    reps = rate_replicates(a, idx) - rate_replicates(b, idx)
    rows = []
    for i, lang in enumerate(langs):
        lo, hi = interval(reps[i], level)
        rows.append(
            {
                "lang": lang,
                "difference": float(point[i]),
                "ci_low": lo,
                "ci_high": hi,
                "excludes_zero": bool(lo > 0 or hi < 0),
            }
        )
    return rows
