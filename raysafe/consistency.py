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
