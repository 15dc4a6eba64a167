"""Per-language bar figures with confidence-interval error bars (matplotlib, Agg backend, PNG at 150 dpi).

:func:`per_language_bars` draws one group of bars per language and one bar per series (a model, or "before" /
"after" in a study report), with the interval as error bars; languages without a value are marked "n/a" rather
than drawn as zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

DPI = 150


def per_language_bars(
    table: pl.DataFrame,
    path: str | Path,
    *,
    value: str = "value",
    lo: str = "ci_low",
    hi: str = "ci_high",
    series: str = "model",
    lang: str = "lang",
    title: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = (0.0, 1.0),
    hline: float | None = None,
) -> Path:
    """Grouped bars of ``value`` per ``lang`` and ``series`` with [lo, hi] error bars (and an optional reference
    line at ``hline``, e.g. chance); returns the PNG path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    langs = list(dict.fromkeys(table[lang].to_list()))
    names = list(dict.fromkeys(table[series].to_list()))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(langs) * max(1, len(names)) ** 0.5 + 2), 3.8))
    x = np.arange(len(langs))
    for s_i, name in enumerate(names):
        sub = {r[lang]: r for r in table.filter(pl.col(series) == name).iter_rows(named=True)}
        vals, err_lo, err_hi, xs, missing = [], [], [], [], []
        for l_i, code in enumerate(langs):
            r = sub.get(code)
            pos = x[l_i] - 0.4 + width * (s_i + 0.5)
            v = None if r is None else r[value]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                missing.append(pos)
                continue
            low, high = r.get(lo), r.get(hi)
            xs.append(pos)
            vals.append(v)
            err_lo.append(0.0 if low is None or math.isnan(low) else max(v - low, 0.0))
            err_hi.append(0.0 if high is None or math.isnan(high) else max(high - v, 0.0))
        bars = ax.bar(
            xs, vals, width * 0.95, label=str(name), yerr=[err_lo, err_hi], capsize=2, error_kw={"elinewidth": 0.8}
        )
        colour = bars.patches[0].get_facecolor() if bars.patches else None
        for pos in missing:
            ax.text(pos, 0.02 if ylim else 0.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color=colour)
    ax.set_xticks(x, langs)
    ax.set_xlim(-0.6, len(langs) - 0.4)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel or value)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8, frameon=False, ncols=min(len(names), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
