"""Concept vectors, recognition, cross-lingual consistency and transfer (Xu et al., 2024): pure numpy functions.

Convention: a concept pair is (positive, negative); ``positive`` is the side that exhibits the concept (for
toxicity, the toxic sentence). For pair ``i`` of one concept and language, ``p_i`` / ``n_i`` are the hidden states
of its positive / negative side at one layer and ``d_i = p_i - n_i``.

* concept vector, ``mean_diff`` (the paper's method): ``v = mean_i p_i - mean_i n_i = mean_i d_i``.
* ``pca`` (RepE-style): ``u`` = first right singular vector of the (uncentred) matrix of differences ``D``, i.e.
  the unit direction maximising ``sum_i (d_i . u)^2`` (invariant to the order of the two sides in a pair);
  raw vector ``v = u * mean_i (d_i . u)`` so its length is the mean gap along ``u``.
* ``logistic``: weight vector of an L2-regularised logistic regression separating ``p_i`` (1) from ``n_i`` (0).

The sign of every vector is fixed on the train split so that positive sides project higher on average
(``mean_i d_i . v >= 0``). A pair is recognised when ``d_i . v > 0`` (ties count as wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Method = Literal["mean_diff", "pca", "logistic"]
METHODS: tuple[str, ...] = ("mean_diff", "pca", "logistic")


@dataclass(frozen=True)
class ConceptVector:
    """A concept direction at one layer: ``raw`` (method-specific scale), ``unit`` (``raw / |raw|``), ``norm``."""

    raw: np.ndarray
    unit: np.ndarray
    norm: float
    method: str


def unit(v: np.ndarray) -> np.ndarray:
    """``v / |v|`` (float64); the zero vector stays zero."""
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else np.zeros_like(v)


def mean_diff_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Difference of class means ``mean(pos) - mean(neg)`` (float64)."""
    return np.asarray(pos, dtype=np.float64).mean(axis=0) - np.asarray(neg, dtype=np.float64).mean(axis=0)


def pca_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """First principal direction of the pair differences ``d_i = pos_i - neg_i`` (uncentred, so a consistent
    offset counts as signal), scaled by the mean projection of the differences on it; sign so that it is >= 0."""
    d = np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    u = vt[0]
    scale = float((d @ u).mean())
    if scale < 0:
        u, scale = -u, -scale
    return u * scale


def logistic_direction(pos: np.ndarray, neg: np.ndarray, *, C: float = 1.0, seed: int = 0) -> np.ndarray:
    """Weight vector of an L2 logistic regression (no feature scaling, with intercept) of side label on the
    hidden state, positive sides labelled 1."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(x, y)
    return clf.coef_[0].astype(np.float64)


def fix_sign(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``v`` or ``-v``, whichever makes the mean projection of ``pos - neg`` non-negative."""
    gap = float(((np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)) @ v).mean())
    return -v if gap < 0 else v


def concept_vector(
    pos: np.ndarray, neg: np.ndarray, method: str = "mean_diff", *, logistic_C: float = 1.0, seed: int = 0
) -> ConceptVector:
    """Fit a concept vector on paired train states (row ``i`` of ``pos`` and ``neg`` is one pair) with ``method``
    and fix its sign so positive sides project higher on average."""
    if method == "mean_diff":
        raw = mean_diff_direction(pos, neg)
    elif method == "pca":
        raw = pca_direction(pos, neg)
    elif method == "logistic":
        raw = logistic_direction(pos, neg, C=logistic_C, seed=seed)
    else:
        raise ValueError(f"unknown concept-vector method {method!r}; use one of {METHODS}")
    raw = fix_sign(raw, pos, neg)
    return ConceptVector(raw=raw, unit=unit(raw), norm=float(np.linalg.norm(raw)), method=method)


def pair_margins(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per-pair projection gap ``(pos_i - neg_i) . v``."""
    return (np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)) @ np.asarray(v, np.float64)


def pair_accuracy(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Share of pairs whose positive side projects strictly higher on ``v``; NaN for zero pairs."""
    if len(pos) == 0:
        return float("nan")
    return float((pair_margins(v, pos, neg) > 0).mean())


def normalised_margin(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Mean over pairs of ``cos(pos_i - neg_i, v)``, in [-1, 1]: how well the direction lines up with the pairs."""
    d = np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)
    norms = np.linalg.norm(d, axis=1)
    u = unit(v)
    ok = norms > 0
    if not ok.any():
        return 0.0
    return float(((d[ok] @ u) / norms[ok]).mean())


def cross_validated_accuracy(
    pos: np.ndarray,
    neg: np.ndarray,
    method: str = "mean_diff",
    *,
    folds: int = 5,
    seed: int = 0,
    logistic_C: float = 1.0,
) -> tuple[float, float]:
    """(accuracy, normalised margin) of ``method`` estimated on the given (train) pairs alone by ``folds``-fold
    cross-validation over pairs; with fewer pairs than folds, in-sample. Used to choose layers without test data."""
    n = len(pos)
    if n < max(folds, 2):
        v = concept_vector(pos, neg, method, logistic_C=logistic_C, seed=seed).raw
        return pair_accuracy(v, pos, neg), normalised_margin(v, pos, neg)
    order = np.random.default_rng(seed).permutation(n)
    correct, margins = 0, []
    for held in np.array_split(order, folds):
        fit = np.setdiff1d(order, held)
        v = concept_vector(pos[fit], neg[fit], method, logistic_C=logistic_C, seed=seed).raw
        correct += int((pair_margins(v, pos[held], neg[held]) > 0).sum())
        margins.append(normalised_margin(v, pos[held], neg[held]) * len(held))
    return correct / n, float(sum(margins) / n)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity between every pair of rows of ``vectors`` [k, d] -> [k, k] (zero rows give 0)."""
    u = np.stack([unit(v) for v in vectors]) if len(vectors) else np.zeros((0, 0))
    return u @ u.T


def transfer_accuracy(vectors: np.ndarray, test_pos: list[np.ndarray], test_neg: list[np.ndarray]) -> np.ndarray:
    """``acc[a, b]`` = recognition accuracy of language ``a``'s vector (row ``a`` of ``vectors``) on language
    ``b``'s test pairs (``test_pos[b]``, ``test_neg[b]``)."""
    k = len(vectors)
    acc = np.full((k, k), np.nan)
    for b in range(k):
        margins = (np.asarray(test_pos[b], np.float64) - np.asarray(test_neg[b], np.float64)) @ np.asarray(
            vectors, np.float64
        ).T
        if len(margins):
            acc[:, b] = (margins > 0).mean(axis=0)
    return acc


def transfer_delta(acc: np.ndarray) -> np.ndarray:
    """``delta[a, b] = acc[a, b] - acc[b, b]``: what using language a's vector costs (or gains) on language b
    compared with b's own vector. The diagonal is zero by construction."""
    delta = acc - np.diag(acc)[None, :]
    np.fill_diagonal(delta, 0.0)
    return delta


def transfer_asymmetry(delta: np.ndarray, langs: list[str], high: set[str]) -> dict[str, float]:
    """Mean transfer delta over high->low and over low->high language pairs (sources in rows), their difference
    ``high_to_low - low_to_high`` and the pair counts. NaN where a group is empty."""
    is_high = np.array([lang in high for lang in langs])
    hl = delta[np.ix_(is_high, ~is_high)]
    lh = delta[np.ix_(~is_high, is_high)]
    mean_hl = float(np.nanmean(hl)) if hl.size else float("nan")
    mean_lh = float(np.nanmean(lh)) if lh.size else float("nan")
    return {
        "mean_high_to_low": mean_hl,
        "mean_low_to_high": mean_lh,
        "high_minus_low": mean_hl - mean_lh,
        "n_high_to_low": int(hl.size),
        "n_low_to_high": int(lh.size),
    }


def correlate(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of paired samples (scipy) with p-values and ``n``; NaN when n < 3 or a
    side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n": int(len(x)), "pearson_r": np.nan, "pearson_p": np.nan, "spearman_rho": np.nan, "spearman_p": np.nan}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    out.update(
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic),
        spearman_p=float(sr.pvalue),
    )
    return out


def best_index(scores: np.ndarray, tie_break: np.ndarray | None = None) -> int:
    """Index of the highest score (NaN ignored); ties go to the higher ``tie_break``, then to the first index.
    -1 when every score is NaN."""
    scores = np.asarray(scores, np.float64)
    if not np.isfinite(scores).any():
        return -1
    s = np.where(np.isfinite(scores), scores, -np.inf)
    cand = np.flatnonzero(s == s.max())
    if tie_break is not None and len(cand) > 1:
        tb = np.asarray(tie_break, np.float64)[cand]
        tb = np.where(np.isfinite(tb), tb, -np.inf)
        cand = cand[tb == tb.max()]
    return int(cand[0])
