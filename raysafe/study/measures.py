"""The study's held-out measures: cross-lingual consistency of base, MLC and control models on prompts never used in
training, with bootstrap intervals, and the paired differences between the models.

Raw-state rank-1 energy and mean cosine are kept for contrast only: they saturate near 1 for any LM (anisotropy),
so they cannot show an MLC effect. The headline measures are the movable ones of :mod:`raysafe.consistency`:
retrieval P@1 / MRR and centred cosine of each language against the anchor, debiased CKA, centred rank-1 energy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from raysafe.consistency import measure_rows, paired_difference_rows, stack_items
from raysafe.errors import DataError

ReadLayer = Callable[[str, int], tuple[pl.DataFrame, np.ndarray]]

#: measures shown in the headline (the others are in the tables)
HEADLINE_MEASURES = ("retrieval_p1", "centred_cosine", "cka")
#: fewer resamples at the layers that only feed the by-layer figure
FIGURE_RESAMPLES = 200


def _states(read_layer: ReadLayer, model: str, layer: int, langs: Sequence[str], split: str | None):
    meta, X = read_layer(model, layer)
    return stack_items(meta, X, langs, split)


def held_out_tables(
    read_layer: ReadLayer,
    roles: dict[str, str],
    layers: Sequence[int],
    langs: Sequence[str],
    anchor: str,
    split: str | None,
    mlc_layer: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(by_layer, differences)`` for the models in ``roles`` (role → model label: ``base``, ``mlc``,
    ``control``). ``by_layer``: role, model, layer, measure, lang, value, ci_low, ci_high, n_items at every layer
    (``resamples`` draws at the MLC layer, :data:`FIGURE_RESAMPLES` elsewhere). ``differences``: comparison
    (``mlc − control``, ``mlc − base``, ``control − base``), layer, measure, lang, difference, ci_low, ci_high,
    excludes_zero, at the MLC layer, paired over the same held-out items."""
    rows, diffs = [], []
    for layer in layers:
        states: dict[str, np.ndarray] = {}
        items0 = None
        for role, model in roles.items():
            s, items, lg = _states(read_layer, model, layer, langs, split)
            if items0 is not None and items != items0:
                raise DataError(
                    f"model {model!r} has held-out states for other items than {next(iter(roles.values()))!r}",
                    where=f"layer {layer}, split {split!r}",
                    fix="extract every model on the same prompts (the study's separation stages do)",
                )
            items0 = items
            states[role] = s
            n = FIGURE_RESAMPLES if layer != mlc_layer else resamples
            for r in measure_rows(s, lg, anchor, resamples=n, seed=seed):
                rows.append({"role": role, "model": model, "layer": layer, "n_items": len(items), **r})
        if layer == mlc_layer:
            for a, b in (("mlc", "control"), ("mlc", "base"), ("control", "base")):
                if a in states and b in states:
                    for r in paired_difference_rows(
                        states[a], states[b], list(langs), anchor, resamples=resamples, seed=seed
                    ):
                        diffs.append({"comparison": f"{a} − {b}", "layer": layer, "n_items": len(items0), **r})
    return pl.DataFrame(rows), pl.DataFrame(diffs)


def claims(differences: pl.DataFrame, measures: Sequence[str] = HEADLINE_MEASURES) -> list[str]:
    """Sentences saying which MLC − control differences are distinguishable from zero and which are not."""
    out = []
    d = differences.filter(pl.col("comparison") == "mlc − control")
    for measure in measures:
        part = d.filter(pl.col("measure") == measure)
        if not part.height:
            continue
        up = part.filter(pl.col("excludes_zero") & (pl.col("difference") > 0))["lang"].to_list()
        down = part.filter(pl.col("excludes_zero") & (pl.col("difference") < 0))["lang"].to_list()
        flat = part.filter(~pl.col("excludes_zero"))["lang"].to_list()
        text = f"{measure}: "
        bits = []
        if up:
            bits.append(f"MLC above control, the 95 % interval excluding 0, in {', '.join(up)}")
        if down:
            bits.append(f"MLC below control, the interval excluding 0, in {', '.join(down)}")
        if flat:
            bits.append(f"not distinguishable from 0 (the interval includes 0) in {', '.join(flat)}")
        out.append(text + "; ".join(bits) + ".")
    return out
