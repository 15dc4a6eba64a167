"""Figures of the separation analysis (matplotlib, Agg backend, PNG at 150 dpi).

* :func:`plot_pca_scatter` — per language, the 2-D PCA of each model side by side (toxic vs benign coloured),
  on shared axes;
* :func:`plot_layer_curves` — per model, one panel per metric: the metric against the layer, one line per
  language with its confidence band;
* :func:`plot_shift_heatmap` — one panel per metric: language × layer heatmap of the alignment shift
  (aligned − base), diverging colormap centred at 0.

Every function writes its files under ``out_dir`` (created if needed) and returns their paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from raysafe.separation.metrics import metric_unit  # noqa: E402

DPI = 150
TOXIC_COLOUR = "#d62728"
BENIGN_COLOUR = "#1f77b4"

METRIC_LABELS: dict[str, str] = {
    "bhattacharyya": "Bhattacharyya distance",
    "silhouette_euclidean": "silhouette (euclidean)",
    "silhouette_cosine": "silhouette (cosine)",
    "centroid_distance": "centroid distance / within spread",
    "between_var_ratio": "between-class variance ratio (PCA)",
    "between_var_ratio_full": "between-class variance ratio (full)",
    "probe_accuracy": "probe accuracy (CV)",
    "pca_explained_variance": "variance inside the PCA",
    "detox_mean_norm": "‖mean detox displacement‖",
    "detox_pair_norm": "mean ‖pair displacement‖",
    "detox_consistency": "displacement consistency",
    "detox_cos_en": "cos(detox, English safety dir.)",
    "detox_proj_en": "detox along English safety dir.",
    "detox_cos_own": "cos(detox, own safety dir.)",
}


def _titled(metric: str) -> str:
    """A panel title: the metric's label and its unit (separation.metrics.METRIC_UNITS)."""
    unit = metric_unit(metric)
    label = METRIC_LABELS.get(metric, metric)
    return f"{label} [{unit}]" if unit else label


def _safe(name: str) -> str:
    """A file-name-safe version of ``name``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _lang_order(langs: Sequence[str], english: str) -> list[str]:
    """Languages sorted, English first."""
    return sorted(set(langs), key=lambda lg: (lg != english, lg))


def plot_pca_scatter(
    points: pl.DataFrame, out_dir: str | Path, *, models: Sequence[str] | None = None, english: str = "en"
) -> list[Path]:
    """One PNG per language, ``scatter_<lang>_layer<L>.png``: a panel per model (in ``models`` order, e.g. base then
    aligned) of the points of :func:`~raysafe.separation.tables.pca_scatter_points`, toxic in red and
    benign in blue, all panels of the figure on the same axis limits (coordinates are in units of each fit's PC1
    standard deviation). Axis labels give each component's explained-variance ratio."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if points.height == 0:
        return []
    models = list(models) if models else list(dict.fromkeys(points["model"].to_list()))
    paths = []
    for layer in sorted(points["layer"].unique().to_list()):
        at_layer = points.filter(pl.col("layer") == layer)
        for lang in _lang_order(at_layer["lang"].to_list(), english):
            sub = at_layer.filter(pl.col("lang") == lang)
            lim = float(np.nanmax(np.abs(sub.select("pc1", "pc2").to_numpy()))) * 1.05 or 1.0
            fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), squeeze=False)
            for ax, model in zip(axes[0], models, strict=True):
                pts = sub.filter(pl.col("model") == model)
                if pts.height == 0:
                    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                else:
                    for label, colour, name in ((0, BENIGN_COLOUR, "benign"), (1, TOXIC_COLOUR, "toxic")):
                        p = pts.filter(pl.col("label") == label)
                        ax.scatter(
                            p["pc1"], p["pc2"], s=6, alpha=0.5, c=colour, label=f"{name} ({p.height})", linewidths=0
                        )
                    ax.set_xlabel(f"PC1 ({100 * pts['ev1'][0]:.1f} % var.)")
                    ax.set_ylabel(f"PC2 ({100 * pts['ev2'][0]:.1f} % var.)")
                    ax.legend(loc="upper right", fontsize=7, markerscale=2)
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                ax.set_aspect("equal")
                ax.set_title(f"{model}", fontsize=10)
                ax.axhline(0, color="0.85", lw=0.5, zorder=0)
                ax.axvline(0, color="0.85", lw=0.5, zorder=0)
            fig.suptitle(f"{lang} — layer {layer}: PCA of hidden states (units: PC1 s.d.)", fontsize=11)
            fig.tight_layout()
            path = out / f"scatter_{_safe(lang)}_layer{layer}.png"
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            paths.append(path)
    return paths


def plot_layer_curves(
    table: pl.DataFrame,
    out_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    english: str = "en",
    prefix: str = "curves",
) -> list[Path]:
    """One PNG per model, ``<prefix>_<model>.png``: a panel per metric with the metric against the layer, one line
    per language (English thicker and black) and a shaded band between ci_low and ci_high. Works on the tables of
    :func:`~raysafe.separation.tables.analyse_separation` and
    :func:`~raysafe.separation.tables.detox_displacement`. Skipped cells are gaps."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = table.filter(pl.col("value").is_not_null() & (pl.col("lang") != "*"))
    if ok.height == 0:
        return []
    metrics = list(metrics) if metrics else list(dict.fromkeys(table["metric"].to_list()))
    langs = _lang_order(ok["lang"].to_list(), english)
    cmap = plt.get_cmap("tab10" if len(langs) <= 10 else "tab20")
    colours = {lg: ("black" if lg == english else cmap(i % cmap.N)) for i, lg in enumerate(langs)}
    paths = []
    for model in dict.fromkeys(table["model"].to_list()):
        mt = ok.filter(pl.col("model") == model)
        ncol = min(4, len(metrics))
        nrow = math.ceil(len(metrics) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.2 * nrow), squeeze=False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            sub = mt.filter(pl.col("metric") == metric)
            for lg in langs:
                s = sub.filter(pl.col("lang") == lg).sort("layer")
                if s.height == 0:
                    continue
                x = s["layer"].to_numpy()
                ax.plot(
                    x,
                    s["value"].to_numpy(),
                    marker="o",
                    ms=3,
                    color=colours[lg],
                    label=lg,
                    lw=2.2 if lg == english else 1.2,
                )
                lo, hi = s["ci_low"].to_numpy(), s["ci_high"].to_numpy()
                band = ~(np.isnan(lo.astype(float)) | np.isnan(hi.astype(float)))
                if band.any():
                    ax.fill_between(
                        x[band], lo[band].astype(float), hi[band].astype(float), color=colours[lg], alpha=0.15, lw=0
                    )
            ax.set_title(_titled(metric), fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=1, frameon=False)
        fig.suptitle(f"{model}: per-language metrics by layer (bands: confidence intervals)", fontsize=11)
        fig.tight_layout(rect=(0, 0, 0.93, 0.96))
        path = out / f"{_safe(prefix)}_{_safe(model)}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_shift_heatmap(
    shift: pl.DataFrame,
    out_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    english: str = "en",
    name: str = "shift_heatmap",
) -> list[Path]:
    """One PNG, ``<name>.png``: a panel per metric with a language × layer heatmap of the alignment shift
    (``shift`` column of :func:`~raysafe.separation.tables.alignment_shift`), diverging colormap centred at
    0 (red: the aligned model separates more), each panel on its own symmetric colour scale; missing cells grey.
    Default ``metrics``: all in the table except ``pca_explained_variance``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shift.height == 0:
        return []
    if not metrics:
        metrics = [m for m in dict.fromkeys(shift["metric"].to_list()) if m != "pca_explained_variance"]
    langs = _lang_order(shift["lang"].to_list(), english)
    layers = sorted(shift["layer"].unique().to_list())
    ncol = min(2, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(
        nrow,
        ncol,
        figsize=(1.2 + 0.42 * len(layers) * ncol + 1.5 * ncol, 0.9 + 0.36 * len(langs) * nrow + 0.6 * nrow),
        squeeze=False,
    )
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    for ax, metric in zip(axes.flat, metrics, strict=False):
        grid = np.full((len(langs), len(layers)), np.nan)
        sub = shift.filter(pl.col("metric") == metric)
        for r in sub.iter_rows(named=True):
            if r["shift"] is not None:
                grid[langs.index(r["lang"]), layers.index(r["layer"])] = r["shift"]
        vmax = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        vmax = vmax or 1.0
        im = ax.imshow(
            np.ma.masked_invalid(grid),
            aspect="auto",
            cmap=cmap,
            norm=TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax),
            interpolation="nearest",
        )
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_yticks(range(len(langs)), langs, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"Δ {_titled(metric)}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.85)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    base = shift["base_model"][0]
    aligned = shift["aligned_model"][0]
    fig.suptitle(f"alignment shift: {aligned} − {base}", fontsize=11)
    fig.tight_layout()
    path = out / f"{_safe(name)}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return [path]
