"""Multilingual safety metrics as pure functions of a (language × prompt-group) outcome matrix (docs/evaluation.md).

An outcome matrix ``X`` has one row per language and one column per prompt group (the translations of one prompt
share a group); ``X[l, g]`` is 1 (safe / correct), 0 (unsafe / wrong) or NaN (no parsed outcome: the language
lacks that prompt, or its judgement was unparsed). Bootstrap replicates are *weights*: ``W[b, g]`` is how often
group ``g`` was drawn in replicate ``b`` (a multinomial draw of G groups out of G), so one resample of prompt
groups is shared by all languages and every statistic of a replicate is a weighted count. With ``W`` = ones every
function returns the plain point estimate.

- rate of language l:           r_l = Σ_g w_g·X[l,g] / Σ_g w_g·[X[l,g] observed]
- mean over languages:          m = (1/L') Σ_l r_l over the L' languages with a rate
- variance across languages:    v = (1/(L'-ddof)) Σ_l (100·r_l − 100·m)²   (percentage points squared)
- agreement of languages a, b:  A_ab = Σ_g w_g·[X[a,g] = X[b,g]] / Σ_g w_g  over groups observed in both
- cross-language agreement:     A = mean of A_ab over the pairs a < b that share at least one observed group
- interval:                     the (α/2, 1 − α/2) percentiles of a statistic over the replicates
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def outcome_matrix(langs: list[str], groups: list[str], cells: dict[tuple[str, str], float]) -> np.ndarray:
    """[L, G] float64 matrix of outcomes (1, 0) with NaN where ``cells`` has no (lang, group) entry."""
    li = {x: i for i, x in enumerate(langs)}
    gi = {x: i for i, x in enumerate(groups)}
    X = np.full((len(langs), len(groups)), np.nan)
    for (lang, group), v in cells.items():
        X[li[lang], gi[group]] = float(v)
    return X


def _weights(X: np.ndarray, W: np.ndarray | None) -> np.ndarray:
    return np.ones((1, X.shape[1])) if W is None else np.atleast_2d(np.asarray(W, dtype=np.float64))


def weighted_rates(X: np.ndarray, W: np.ndarray | None = None) -> np.ndarray:
    """Per-language rates: [L] for W None, else [B, L]; NaN where a language has no observed outcome."""
    X = np.asarray(X, dtype=np.float64)
    obs = ~np.isnan(X)
    Wm = _weights(X, W)
    num = Wm @ np.where(obs, X, 0.0).T
    den = Wm @ obs.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return r[0] if W is None else r


def language_mean(rates: np.ndarray) -> np.ndarray | float:
    """Mean over languages (last axis), ignoring languages without a rate."""
    r = np.asarray(rates, dtype=np.float64)
    n = np.sum(~np.isnan(r), axis=-1)
    s = np.nansum(r, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n > 0, s / np.where(n > 0, n, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def language_variance(rates: np.ndarray, ddof: int = 0, scale: float = 100.0) -> np.ndarray | float:
    """Variance across languages (last axis) of ``scale``·rate: percentage points squared by default."""
    r = np.asarray(rates, dtype=np.float64) * scale
    n = np.sum(~np.isnan(r), axis=-1)
    m = language_mean(r)
    dev = np.nansum((r - np.expand_dims(np.asarray(m), -1)) ** 2, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n - ddof > 0, dev / np.where(n - ddof > 0, n - ddof, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def pp2_to_fraction2(variance_pp2: float) -> float:
    """A variance of rates given in percentage points squared, expressed for rates as fractions: ``v / 100²``."""
    return variance_pp2 / 1e4


def pairwise_agreement(
    X: np.ndarray, W: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(overall agreement [B] or scalar, per-pair agreement [B, P] or [P], the pairs (a, b) with a < b).

    A pair whose languages share no observed group has agreement NaN and is left out of the overall mean.
    """
    X = np.asarray(X, dtype=np.float64)
    L = X.shape[0]
    pairs = list(combinations(range(L), 2))
    Wm = _weights(X, W)
    if not pairs:
        empty = np.full((Wm.shape[0], 0), np.nan)
        overall = np.full(Wm.shape[0], np.nan)
        return (float(overall[0]), empty[0], pairs) if W is None else (overall, empty, pairs)
    obs = ~np.isnan(X)
    both = np.stack([obs[a] & obs[b] for a, b in pairs], axis=1).astype(np.float64)  # [G, P]
    same = np.stack([obs[a] & obs[b] & (X[a] == X[b]) for a, b in pairs], axis=1).astype(np.float64)
    num = Wm @ same
    den = Wm @ both
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    overall = language_mean(per_pair)
    if W is None:
        return float(np.asarray(overall).reshape(-1)[0]), per_pair[0], pairs
    return np.asarray(overall), per_pair, pairs


def bootstrap_weights(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_groups] multiplicities of a resample of groups with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    if n_groups == 0 or n_boot == 0:
        return np.zeros((n_boot, n_groups))
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval over replicates (axis 0), ignoring NaN replicates; (nan, nan) if none."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size == 0 or np.all(np.isnan(s)):
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    lo, hi = np.nanpercentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return float(lo), float(hi)


def percentile_intervals(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise percentile intervals of [B, K] replicates: (lo [K], hi [K]); NaN for all-NaN columns."""
    s = np.asarray(samples, dtype=np.float64)
    lo = np.full(s.shape[1], np.nan)
    hi = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):
        lo[k], hi[k] = percentile_interval(s[:, k], confidence)
    return lo, hi


def group_statistics(
    X: np.ndarray, *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95, ddof: int = 0
) -> dict:
    """Every statistic of an outcome matrix with bootstrap intervals from one shared resample of groups.

    Returns ``rates`` [L], ``rates_lo``/``rates_hi`` [L], ``mean``, ``mean_ci``, ``variance``, ``variance_ci``,
    ``agreement``, ``agreement_ci``, ``pair_agreement`` [P], ``pair_lo``/``pair_hi`` [P], ``pairs``, ``n_common``
    [P] (groups observed in both languages of a pair).
    """
    X = np.asarray(X, dtype=np.float64)
    rates = weighted_rates(X)
    agreement, per_pair, pairs = pairwise_agreement(X)
    obs = ~np.isnan(X)
    n_common = np.array([int(np.sum(obs[a] & obs[b])) for a, b in pairs], dtype=np.int64)
    out = {
        "rates": rates,
        "mean": language_mean(rates),
        "variance": language_variance(rates, ddof),
        "agreement": agreement,
        "pair_agreement": per_pair,
        "pairs": pairs,
        "n_common": n_common,
    }
    nan_l = np.full(X.shape[0], np.nan)
    nan_p = np.full(len(pairs), np.nan)
    if n_boot > 0 and X.shape[1] > 0:
        W = bootstrap_weights(X.shape[1], n_boot, seed)
        r_b = weighted_rates(X, W)
        # Languages without any observation stay NaN; a replicate that misses all of a language's groups is
        # skipped for that language's interval (nanpercentile).
        out["rates_lo"], out["rates_hi"] = percentile_intervals(r_b, confidence)
        keep = ~np.isnan(rates)
        r_kept = r_b[:, keep]
        out["mean_ci"] = percentile_interval(language_mean(r_kept), confidence)
        out["variance_ci"] = percentile_interval(language_variance(r_kept, ddof), confidence)
        a_b, p_b, _ = pairwise_agreement(X, W)
        out["agreement_ci"] = percentile_interval(a_b, confidence)
        out["pair_lo"], out["pair_hi"] = percentile_intervals(p_b, confidence) if pairs else (nan_p, nan_p)
    else:
        out.update(
            rates_lo=nan_l,
            rates_hi=nan_l,
            mean_ci=(float("nan"),) * 2,
            variance_ci=(float("nan"),) * 2,
            agreement_ci=(float("nan"),) * 2,
            pair_lo=nan_p,
            pair_hi=nan_p,
        )
    return out
