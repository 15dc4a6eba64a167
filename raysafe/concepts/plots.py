"""Figures of the concept analysis (matplotlib, Agg canvas, PNG at 150 dpi), drawn from the tables of
:func:`raysafe.concepts.tables.analyse_concepts` and :func:`raysafe.models.steering.measure_steering`.

The figures are built on ``matplotlib.figure.Figure`` directly, so importing this module does not touch pyplot or
the process-wide backend.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

DPI = 150
MEAN = "mean"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _matrix(rows: list[tuple[str, str, float]], symmetric: bool) -> tuple[list[str], np.ndarray]:
    langs = sorted({a for a, _, _ in rows} | {b for _, b, _ in rows})
    pos = {lang: i for i, lang in enumerate(langs)}
    m = np.full((len(langs), len(langs)), np.nan)
    for a, b, v in rows:
        m[pos[a], pos[b]] = v
        if symmetric:
            m[pos[b], pos[a]] = v
    if symmetric:
        np.fill_diagonal(m, 1.0)
    return langs, m


def _heatmap(
    fig: Figure,
    m: np.ndarray,
    langs: list[str],
    title: str,
    *,
    cmap: str,
    norm=None,
    vmin=None,
    vmax=None,
    xlabel: str = "",
    ylabel: str = "",
    cbar: str = "",
) -> None:
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(
        np.ma.masked_invalid(m), cmap=cmap, norm=norm, vmin=None if norm else vmin, vmax=None if norm else vmax
    )
    ax.set_xticks(range(len(langs)), langs, rotation=90 if len(langs) > 8 else 0)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(langs) <= 12:
        for i in range(len(langs)):
            for j in range(len(langs)):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()


def plot_recognition(recognition_best: pl.DataFrame, out_dir: str | Path) -> list[Path]:
    """One bar chart per concept: test accuracy per language at the layer chosen on train data (bars), with the
    optimistic test-selected accuracy as a marker and chance (0.5) as a dashed line."""
    out, paths = Path(out_dir), []
    for (model, concept), part in recognition_best.sort("lang").group_by(["model", "concept"], maintain_order=True):
        langs = part["lang"].to_list()
        fig = Figure(figsize=(max(5.0, 0.5 * len(langs) + 2), 3.8))
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(langs))
        ax.bar(
            x,
            part["test_acc_at_train_selected_layer"].to_numpy(),
            color="tab:blue",
            label="test acc. at layer chosen on train",
        )
        ax.scatter(
            x,
            part["test_acc_at_test_selected_layer"].to_numpy(),
            color="tab:orange",
            marker="_",
            s=200,
            zorder=3,
            label="best test acc. over layers (optimistic)",
        )
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(x, langs)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("recognition accuracy")
        ax.set_title(f"{concept} — {model}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
        fig.tight_layout()
        paths.append(_save(fig, out / f"recognition_{_slug(concept)}.png"))
    return paths


def plot_similarity_heatmaps(
    consistency_summary: pl.DataFrame, concept_layers: pl.DataFrame | None, out_dir: str | Path
) -> list[Path]:
    """Language x language cosine of concept vectors: one heatmap per concept at its train-selected layer, and
    one of the mean over concepts (each at its own layer)."""
    out, paths = Path(out_dir), []
    layer_of = (
        dict(concept_layers.select("concept", "layer_selected_on_train").iter_rows())
        if concept_layers is not None
        else {}
    )
    for (model, concept), part in consistency_summary.group_by(["model", "concept"], maintain_order=True):
        rows = part.select("lang_a", "lang_b", "cosine_at_concept_layer").rows()
        langs, m = _matrix(rows, symmetric=True)
        where = (
            "mean over concepts, each at its selected layer"
            if concept == MEAN
            else f"layer {layer_of.get(concept, '?')}"
        )
        fig = Figure(figsize=(0.45 * len(langs) + 3, 0.45 * len(langs) + 2.2))
        _heatmap(
            fig,
            m,
            langs,
            f"{concept}: cross-lingual cosine ({where})\n{model}",
            cmap="viridis",
            vmin=-1,
            vmax=1,
            cbar="cosine similarity",
        )
        paths.append(_save(fig, out / f"similarity_{_slug(concept)}.png"))
    return paths


def plot_consistency_curve(consistency_curve: pl.DataFrame, out_dir: str | Path) -> Path:
    """Mean cross-lingual cosine over language pairs against layer, one line per concept (the mean in black)."""
    fig = Figure(figsize=(6, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for (concept,), part in consistency_curve.sort("layer").group_by(["concept"], maintain_order=True):
        style = dict(color="black", linewidth=2.5) if concept == MEAN else dict(linewidth=1.2)
        ax.plot(part["layer"].to_numpy(), part["mean_cosine"].to_numpy(), label=concept, **style)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine over language pairs")
    models = consistency_curve["model"].unique().to_list()
    ax.set_title(f"cross-lingual consistency by layer — {', '.join(models)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(out_dir) / "consistency_curve.png")


def plot_similarity_vs_distance(
    distance_pairs: pl.DataFrame, distance_correlation: pl.DataFrame, out_dir: str | Path, concept: str = MEAN
) -> list[Path]:
    """Scatter of concept-vector similarity against relatedness (1 - URIEL distance) per distance type, colored
    by resource group, with the least-squares line and Pearson r (all pairs) in the title."""
    out, paths = Path(out_dir), []
    colors = {"high_high": "tab:blue", "high_low": "tab:purple", "low_low": "tab:red"}
    part_all = distance_pairs.filter(pl.col("concept") == concept)
    for (dt,), part in part_all.group_by(["distance_type"], maintain_order=True):
        fig = Figure(figsize=(5, 4))
        ax = fig.add_subplot(1, 1, 1)
        for group, color in colors.items():
            g = part.filter(pl.col("pair_group") == group)
            if g.height:
                ax.scatter(
                    g["relatedness"].to_numpy(),
                    g["similarity"].to_numpy(),
                    color=color,
                    s=18,
                    label=group.replace("_", "–"),
                )
        x, y = part["relatedness"].to_numpy(), part["similarity"].to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slope, intercept = np.polyfit(x[ok], y[ok], 1)
            xs = np.linspace(x[ok].min(), x[ok].max(), 50)
            ax.plot(xs, slope * xs + intercept, color="black", linewidth=1)
        corr = distance_correlation.filter(
            (pl.col("concept") == concept) & (pl.col("distance_type") == dt) & (pl.col("subset") == "all")
        )
        r = corr["pearson_r"][0] if corr.height else float("nan")
        rho = corr["spearman_rho"][0] if corr.height else float("nan")
        ax.set_xlabel(f"1 − {dt} distance (URIEL)")
        ax.set_ylabel("concept-vector cosine")
        ax.set_title(f"{concept}: similarity vs {dt} relatedness\nPearson r = {r:.2f}, Spearman ρ = {rho:.2f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / f"similarity_vs_{_slug(dt)}_{_slug(concept)}.png"))
    return paths


def plot_transfer(transfer_best: pl.DataFrame, out_dir: str | Path, summary: str = "selected") -> list[Path]:
    """Heatmap of acc(A->B) - acc(B->B) (source A in rows, target B in columns) per concept and averaged, on a
    diverging scale centred at 0; ``summary="selected"`` for ``transfer_best`` (each concept's train-selected
    layer, files ``transfer_<concept>.png``), ``"max"`` for ``transfer_max`` (max over layers, the paper's,
    files ``transfer_max_<concept>.png``)."""
    out, paths = Path(out_dir), []
    prefix = "transfer_max" if summary == "max" else "transfer"
    for (model, concept), part in transfer_best.group_by(["model", "concept"], maintain_order=True):
        langs, m = _matrix(part.select("source_lang", "target_lang", "delta").rows(), symmetric=False)
        span = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
        span = max(span, 1e-3)
        layer = part["layer"][0]
        if summary == "max":
            where = "max over layers" + (", mean over concepts" if concept == MEAN else "")
        else:
            where = "mean over concepts" if concept == MEAN else f"layer {layer}"
        fig = Figure(figsize=(0.45 * len(langs) + 3, 0.45 * len(langs) + 2.2))
        _heatmap(
            fig,
            m,
            langs,
            f"{concept}: transfer acc(A→B) − acc(B→B) ({where})\n{model}",
            cmap="RdBu_r",
            norm=TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span),
            xlabel="target B (test pairs)",
            ylabel="source A (vector)",
            cbar="accuracy difference",
        )
        paths.append(_save(fig, out / f"{prefix}_{_slug(concept)}.png"))
    return paths


STEERING_PANELS = (
    ("projection_shift", "projection shift"),
    ("behaviour_score", "behaviour score (log-prob pos − neg)"),
    ("perplexity", "perplexity (neutral text)"),
)


def plot_steering(steering: pl.DataFrame, out_dir: str | Path, name: str = "steering") -> list[Path]:
    """For each set of steered layers (and each concept, when the table has a ``concept`` column): alpha on x;
    projection shift, behaviour score and perplexity on y (three panels), one line per target language."""
    out, paths = Path(out_dir), []
    keys = ["concept", "layers"] if "concept" in steering.columns else ["layers"]
    for key, part in steering.sort("alpha").group_by(keys, maintain_order=True):
        layers = key[-1]
        concept = key[0] if len(key) == 2 else None
        fig = Figure(figsize=(12, 3.6))
        panels = list(STEERING_PANELS)
        if "projection_shift_in_gaps" in part.columns:  # comparable across languages and layers
            panels[0] = ("projection_shift_in_gaps", "projection shift (in unsteered pair gaps)")
        for k, (column, label) in enumerate(panels, start=1):
            ax = fig.add_subplot(1, 3, k)
            for (lang,), g in part.group_by(["lang"], maintain_order=True):
                ax.plot(g["alpha"].to_numpy(), g[column].to_numpy(), marker="o", markersize=3, label=lang)
            ax.set_xlabel("α")
            ax.set_ylabel(label)
            ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
            if k == 1:
                ax.legend(fontsize=7)
        source = f" with the {part['source_lang'][0]} vector" if "source_lang" in part.columns else ""
        fig.suptitle(f"{concept + ': ' if concept else ''}steering at layer(s) {layers}{source}")
        fig.tight_layout()
        stem = f"{_slug(name)}_{_slug(concept)}" if concept else _slug(name)
        paths.append(_save(fig, out / f"{stem}_layers_{_slug(layers)}.png"))
    return paths


def plot_steering_judged(judged: pl.DataFrame, out_dir: str | Path) -> list[Path]:
    """Per concept and steered layer set: the share of generations the probe judge marks as exhibiting the concept
    (y) against alpha (x), one line per target language."""
    out, paths = Path(out_dir), []
    for (concept, layers), part in judged.sort("alpha").group_by(["concept", "layers"], maintain_order=True):
        fig = Figure(figsize=(5, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        for (lang,), g in part.group_by(["lang"], maintain_order=True):
            ax.plot(g["alpha"].to_numpy(), g["judged_concept_rate"].to_numpy(), marker="o", markersize=3, label=lang)
        ax.set_xlabel("α")
        ax.set_ylabel(f"share of generations judged {concept}")
        ax.set_ylim(-0.05, 1.05)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{concept}: generations under steering at layer(s) {layers}\n(probe judge)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / f"steering_judged_{_slug(concept)}_layers_{_slug(layers)}.png"))
    return paths


def plot_concepts(
    tables: dict[str, pl.DataFrame],
    out_dir: str | Path,
    steering: pl.DataFrame | None = None,
    judged: pl.DataFrame | None = None,
) -> dict[str, list[Path]]:
    """All figures of one concept analysis (and a steering sweep, if given) into ``out_dir``; returns the paths
    per figure kind. Kinds whose table is empty are skipped."""
    out = Path(out_dir)
    figs: dict[str, list[Path]] = {}
    if tables["recognition_best"].height:
        figs["recognition"] = plot_recognition(tables["recognition_best"], out)
    if tables["consistency_summary"].height:
        figs["similarity"] = plot_similarity_heatmaps(tables["consistency_summary"], tables.get("concept_layers"), out)
        figs["consistency_curve"] = [plot_consistency_curve(tables["consistency_curve"], out)]
    if tables["distance_pairs"].height:
        figs["similarity_vs_distance"] = plot_similarity_vs_distance(
            tables["distance_pairs"], tables["distance_correlation"], out
        )
    if tables["transfer_best"].height:
        figs["transfer"] = plot_transfer(tables["transfer_best"], out)
    if tables.get("transfer_max") is not None and tables["transfer_max"].height:
        figs["transfer_max"] = plot_transfer(tables["transfer_max"], out, summary="max")
    if steering is not None and steering.height:
        figs["steering"] = plot_steering(steering, out)
    if judged is not None and judged.height:
        figs["steering_judged"] = plot_steering_judged(judged, out)
    return figs
