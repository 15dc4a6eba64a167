"""Cross-lingual consistency of hidden states: how close the m language variants of one prompt sit.

For each item (``group_id``) with a state in every language considered, ``H`` [m, hidden] holds its last-prompt-token
states; rows are L2-normalised. Per item: the rank-1 energy ratio ``σ₁² / Σσ²`` of the normalised ``H`` (1 when all
languages are collinear, 1/m when they are orthogonal) and the mean pairwise cosine between languages; both are
averaged over items. This is what the MLC loss pushes up during training, measured here on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from raysafe.bootstrap import bootstrap_indices, interval
from raysafe.errors import DataError

ReadLayer = Callable[[str, int], tuple[pl.DataFrame, np.ndarray]]


def normalise_rows(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``z [..., m, d]`` scaled to unit L2 norm (a zero row stays zero), in float32 or float64."""
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return F.normalize(z, p=2.0, dim=-1, eps=eps)


def mean_offdiag_cosine(x: torch.Tensor) -> torch.Tensor:
    """Per-item mean cosine similarity over the ``m(m−1)`` ordered pairs of distinct rows of ``x [B, m, d]``."""
    xn = normalise_rows(x)
    gram = xn @ xn.transpose(-1, -2)
    m = x.shape[-2]
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (m * (m - 1))


@torch.no_grad()
def mlc_diagnostics(z: torch.Tensor, hidden: torch.Tensor | None = None) -> dict[str, float | list[float]]:
    """Cross-lingual consistency diagnostics of one batch of variant representations.

    ``z [B, m, d]`` projected (rows normalised here), ``hidden [B, m, H]`` raw hidden states (optional):

    - ``spectrum``: singular values of the normalised ``Z_b``, averaged over the batch (descending);
    - ``rank1_energy``: mean over items of ``σ₁² / Σ_j σ_j²`` (1 = all languages collinear, 1/m = orthogonal);
    - ``cosine_z``: mean pairwise cosine between languages on ``z``;
    - ``cosine_hidden``: the same on the raw hidden states (only when ``hidden`` is given).
    """
    sigma = torch.linalg.svdvals(normalise_rows(z))
    energy = sigma**2
    out: dict[str, float | list[float]] = {
        "spectrum": sigma.mean(0).tolist(),
        "rank1_energy": float((energy[:, 0] / energy.sum(-1).clamp(min=1e-30)).mean()),
        "cosine_z": float(mean_offdiag_cosine(z).mean()),
    }
    if hidden is not None:
        out["cosine_hidden"] = float(mean_offdiag_cosine(hidden).mean())
    return out


def stack_items(
    meta: pl.DataFrame, X: np.ndarray, languages: Sequence[str] | None = None, split: str | None = "test"
) -> tuple[np.ndarray, list[str], list[str]]:
    """[items, m, hidden] for the items that have every language, with the item ids and the language order."""
    keep = np.ones(meta.height, dtype=bool)
    if split is not None and "split" in meta.columns:
        keep &= (meta["split"] == split).to_numpy()
    langs = sorted(set(meta["lang"].to_list())) if languages is None else list(languages)
    keep &= meta["lang"].is_in(langs).to_numpy()
    sub = meta.with_row_index("_i").filter(pl.Series(keep))
    complete = sub.group_by("group_id").agg(pl.col("lang").n_unique().alias("k")).filter(pl.col("k") == len(langs))
    sub = sub.join(complete.select("group_id"), on="group_id").sort(["group_id", "lang"])
    if sub.height == 0:
        raise DataError(
            f"no item has a state in every one of the languages {langs}",
            where=f"split {split!r}",
            fix="choose languages that every item was translated into",
        )
    order = {lang: i for i, lang in enumerate(langs)}
    items = sub["group_id"].unique(maintain_order=True).to_list()
    out = np.empty((len(items), len(langs), X.shape[1]), dtype=np.float32)
    pos = {g: i for i, g in enumerate(items)}
    for idx, g, lang in sub.select("_i", "group_id", "lang").iter_rows():
        out[pos[g], order[lang]] = X[idx]
    return out, items, langs


def consistency(states: np.ndarray) -> dict[str, float]:
    """Mean rank-1 energy ratio and mean pairwise cosine of ``states`` [items, m, hidden]."""
    h = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float64))
    d = mlc_diagnostics(h, hidden=h)
    return {"rank1_energy": float(d["rank1_energy"]), "mean_cosine": float(d["cosine_hidden"])}


def consistency_table(
    read_layer: ReadLayer,
    models: Sequence[str],
    layers: Sequence[int],
    languages: Sequence[str] | None = None,
    split: str | None = "test",
) -> pl.DataFrame:
    """model, layer, n_items, m, rank1_energy, mean_cosine — one layer of one model in memory at a time."""
    rows = []
    for model in models:
        for layer in layers:
            meta, X = read_layer(model, layer)
            states, items, langs = stack_items(meta, X, languages, split)
            rows.append({"model": model, "layer": layer, "n_items": len(items), "m": len(langs), **consistency(states)})
    return pl.DataFrame(rows)


# ------------------------------------------------------------------------------------ measures that can move
# Raw hidden states of a language model are anisotropic: one shared direction dominates every state, so the mean
# cosine between any two states is close to 1 (0.99 on Gemma 3 270M) and rank-1 energy and mean cosine of raw states
# cannot tell two models apart. The measures below remove that shared part (mean-centring over all prompts and
# languages of one layer) or ask a question it cannot answer (which prompt is this?).
def centre(states: np.ndarray) -> np.ndarray:
    """``states [items, m, hidden]`` minus their mean over all items and languages (one layer's common direction)."""
    x = np.asarray(states, dtype=np.float64)
    return x - x.reshape(-1, x.shape[-1]).mean(0)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def rank1_energy_per_item(states: np.ndarray) -> np.ndarray:
    """[items]: ``σ₁² / Σσ²`` of each item's row-normalised ``[m, hidden]`` matrix (1 = collinear, 1/m = orthogonal)."""
    s = np.linalg.svd(_unit(np.asarray(states, dtype=np.float64)), compute_uv=False)
    e = s**2
    return e[:, 0] / np.maximum(e.sum(-1), 1e-300)


def pair_cosine_per_item(states: np.ndarray, a: int, b: int) -> np.ndarray:
    """[items]: cosine between each item's states in languages ``a`` and ``b`` (indices into the m axis)."""
    u = _unit(np.asarray(states, dtype=np.float64))
    return np.einsum("id,id->i", u[:, a], u[:, b])


def retrieval_per_query(states: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Cross-lingual retrieval of each item's language-``a`` state among all items' language-``b`` states, by
    cosine. Returns ``(hit, rr)`` [items]: 1 where the item itself ranks first, and the reciprocal of its rank (ties
    count against it: rank = 1 + the number of candidates scoring at least as high, other than itself)."""
    u = _unit(np.asarray(states, dtype=np.float64))
    sim = u[:, a] @ u[:, b].T  # [queries, candidates]
    own = np.diag(sim)
    others = sim >= own[:, None]
    np.fill_diagonal(others, False)
    rank = 1 + others.sum(1)
    return (rank == 1).astype(np.float64), 1.0 / rank


def _hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) of two n × n Gram matrices (n ≥ 4)."""
    n = k.shape[0]
    k = k.copy()
    l_ = l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    kl = k @ l_
    return float((np.trace(kl) + k.sum() * l_.sum() / ((n - 1) * (n - 2)) - 2.0 * kl.sum() / (n - 2)) / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = True) -> float:
    """Linear CKA (Kornblith et al. 2019) between ``x [n, d1]`` and ``y [n, d2]`` whose rows are the same n items,
    in the n × n Gram form (cheap when n ≪ hidden). 1 for representations equal up to rotation, translation and
    isotropic scale, near 0 for unrelated ones. ``debiased`` (default): HSIC by its unbiased estimator, so the value
    does not drift upward at small n (the plain estimator reads 0.9 for n = 60 items of 32 noisy dimensions where the
    population value is lower); ``debiased=False``: the plain ``⟨K̃, L̃⟩ / (‖K̃‖ ‖L̃‖)`` of the centred Grams."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    k, l_ = x @ x.T, y @ y.T
    if debiased:
        if x.shape[0] < 4:
            return float("nan")
        den = np.sqrt(max(_hsic_unbiased(k, k), 0.0) * max(_hsic_unbiased(l_, l_), 0.0))
        return _hsic_unbiased(k, l_) / den if den > 0 else float("nan")
    den = np.linalg.norm(k) * np.linalg.norm(l_)
    return float((k * l_).sum() / den) if den > 0 else float("nan")


def _cka_replicates(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Debiased CKA of ``x`` and ``y`` on each resample's *distinct* items: a duplicated row counts as a perfectly
    matching pair and inflates CKA, so each replicate keeps one copy of each drawn item — about 63 % of the items,
    which makes the interval wider (conservative), not narrower."""
    return np.array([linear_cka(x[u], y[u]) for u in (np.unique(j) for j in idx)])


def item_measures(states: np.ndarray, langs: Sequence[str], anchor: str) -> dict[str, dict[str, np.ndarray]]:
    """Per-item values of the movable measures, per language against the ``anchor`` language.

    ``{measure: {lang: [items]}}`` with measures ``centred_cosine`` (cosine of the centred states of the item in
    ``lang`` and in the anchor), ``retrieval_p1`` and ``retrieval_mrr`` (retrieval both ways between ``lang`` and the
    anchor, averaged over the two directions), and under the key ``"all"`` ``centred_rank1`` (rank-1 energy of the
    item's centred states over every language) and ``raw_cosine`` (the saturated raw-state cosine, for contrast)."""
    if anchor not in langs:
        raise DataError(
            f"anchor language {anchor!r} has no states", where=f"languages {list(langs)}", fix="measure with the anchor"
        )
    c = centre(states)
    ai = list(langs).index(anchor)
    out: dict[str, dict[str, np.ndarray]] = {"centred_cosine": {}, "retrieval_p1": {}, "retrieval_mrr": {}}
    for i, lang in enumerate(langs):
        if i == ai:
            continue
        out["centred_cosine"][lang] = pair_cosine_per_item(c, i, ai)
        hit_ab, rr_ab = retrieval_per_query(c, i, ai)
        hit_ba, rr_ba = retrieval_per_query(c, ai, i)
        out["retrieval_p1"][lang] = (hit_ab + hit_ba) / 2
        out["retrieval_mrr"][lang] = (rr_ab + rr_ba) / 2
    raw = np.asarray(states, dtype=np.float64)
    m = raw.shape[1]
    u = _unit(raw)
    gram = np.einsum("imd,ind->imn", u, u)
    out["centred_rank1"] = {"all": rank1_energy_per_item(c)}
    out["raw_cosine"] = {"all": (gram.sum((1, 2)) - m) / (m * (m - 1))}
    return out


def measure_rows(
    states: np.ndarray, langs: Sequence[str], anchor: str, *, resamples: int = 1000, seed: int = 0
) -> list[dict]:
    """One row per (measure, language): the point estimate over items and its 95 % bootstrap interval over items
    (percentile, ``resamples`` draws of the items with replacement, the draws fixed by ``seed``). CKA per language
    against the anchor is included (recomputed on each resample's distinct items, see :func:`_cka_replicates`)."""
    n = states.shape[0]
    idx = bootstrap_indices(n, resamples, seed)
    rows = []
    for measure, by_lang in item_measures(states, langs, anchor).items():
        for lang, v in by_lang.items():
            lo, hi = interval(v[idx].mean(1))
            rows.append({"measure": measure, "lang": lang, "value": float(v.mean()), "ci_low": lo, "ci_high": hi})
    c = centre(states)
    ai = list(langs).index(anchor)
    for i, lang in enumerate(langs):
        if i == ai:
            continue
        lo, hi = interval(_cka_replicates(c[:, i], c[:, ai], idx))
        rows.append(
            {"measure": "cka", "lang": lang, "value": linear_cka(c[:, i], c[:, ai]), "ci_low": lo, "ci_high": hi}
        )
    return rows


def paired_difference_rows(
    states_a: np.ndarray,
    states_b: np.ndarray,
    langs: Sequence[str],
    anchor: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Model a − model b on the same items (``states_*`` [items, m, hidden], rows in the same item order): the
    difference of each measure with a 95 % paired-bootstrap interval (both models' values recomputed on the same
    resampled items), and ``excludes_zero`` when the interval lies wholly on one side of 0."""
    if states_a.shape[:2] != states_b.shape[:2]:
        raise DataError(
            f"the two models were measured on different items ({states_a.shape[:2]} vs {states_b.shape[:2]})",
            where="paired difference",
            fix="measure both models on the same held-out items and languages",
        )
    n = states_a.shape[0]
    idx = bootstrap_indices(n, resamples, seed)
    ma, mb = item_measures(states_a, langs, anchor), item_measures(states_b, langs, anchor)
    rows = []
    for measure, by_lang in ma.items():
        for lang, va in by_lang.items():
            d = va - mb[measure][lang]
            rows.append(_diff_row(measure, lang, float(d.mean()), d[idx].mean(1)))
    ca, cb = centre(states_a), centre(states_b)
    ai = list(langs).index(anchor)
    for i, lang in enumerate(langs):
        if i == ai:
            continue
        point = linear_cka(ca[:, i], ca[:, ai]) - linear_cka(cb[:, i], cb[:, ai])
        reps = _cka_replicates(ca[:, i], ca[:, ai], idx) - _cka_replicates(cb[:, i], cb[:, ai], idx)
        rows.append(_diff_row("cka", lang, point, reps))
    return rows


def _diff_row(measure: str, lang: str, point: float, replicates: np.ndarray) -> dict:
    lo, hi = interval(replicates)
    return {
        "measure": measure,
        "lang": lang,
        "difference": point,
        "ci_low": lo,
        "ci_high": hi,
        "excludes_zero": bool(lo > 0 or hi < 0),
    }
