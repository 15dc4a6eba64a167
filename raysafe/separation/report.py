"""Markdown report of the separation analysis: figures linked, a per-language summary table per metric (best layer
per language and model, English-relative ratios, the alignment shift), the detox summary and the cells that were
skipped or degraded."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from raysafe.separation.metrics import SEPARATION_METRICS, metric_unit
from raysafe.separation.plots import METRIC_LABELS

#: Metrics summarised in the report (all separation metrics whose larger value means more separation).
SUMMARY_METRICS: tuple[str, ...] = tuple(m for m in SEPARATION_METRICS if m != "pca_explained_variance")


def _fmt(x: float | None, digits: int = 3) -> str:
    """A number for a Markdown cell ('–' for missing)."""
    if x is None:
        return "–"
    if abs(x) >= 1000 or (0 < abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def _lang_order(langs: Sequence[str], english: str) -> list[str]:
    """Languages sorted, English first."""
    return sorted(set(langs), key=lambda lg: (lg != english, lg))


def best_layers(table: pl.DataFrame, english: str = "en") -> pl.DataFrame:
    """Per (model, metric, lang): the layer with the largest value, that value and its interval, and
    ``ratio_en`` = this best value / English's best value for the same model and metric (null when English has
    no positive best value). Rows with no value are ignored."""
    ok = table.filter(pl.col("value").is_not_null() & pl.col("value").is_finite())
    if ok.height == 0:
        return pl.DataFrame(
            schema={
                "model": pl.String,
                "metric": pl.String,
                "lang": pl.String,
                "layer": pl.Int64,
                "value": pl.Float64,
                "ci_low": pl.Float64,
                "ci_high": pl.Float64,
                "unit": pl.String,
                "ratio_en": pl.Float64,
            }
        )
    best = (
        ok.sort(["value", "layer"], descending=[True, False])
        .group_by(["model", "metric", "lang"], maintain_order=True)
        .first()
        .select("model", "metric", "lang", "layer", "value", "ci_low", "ci_high", "unit")
    )
    en = best.filter(pl.col("lang") == english).select("model", "metric", pl.col("value").alias("_en"))
    best = (
        best.join(en, on=["model", "metric"], how="left")
        .with_columns(
            pl.when(pl.col("_en") > 0).then(pl.col("value") / pl.col("_en")).otherwise(None).alias("ratio_en")
        )
        .drop("_en")
    )
    return best.sort(["model", "metric", "lang"])


def _summary_section(
    table: pl.DataFrame, shift: pl.DataFrame | None, metric: str, models: list[str], english: str
) -> list[str]:
    """Markdown lines of one metric's per-language summary table."""
    best = best_layers(table.filter(pl.col("metric") == metric), english)
    langs = _lang_order(table.filter(pl.col("metric") == metric)["lang"].to_list(), english)
    langs = [lg for lg in langs if lg != "*"]
    if not langs:
        return []
    head = ["lang"]
    for m in models:
        head += [f"{m}: best layer", f"{m}: value [CI]", f"{m}: ×{english}"]
    sh = None
    if shift is not None and shift.height:
        sh = (
            shift.filter((pl.col("metric") == metric) & pl.col("shift").is_not_null())
            .sort(["shift", "layer"], descending=[True, False])
            .group_by("lang", maintain_order=True)
            .first()
        )
        head += ["largest shift at layer", "shift", f"shift ×{english} (same layer)"]
    lines = [
        f"### {METRIC_LABELS.get(metric, metric)} (`{metric}`, unit: {metric_unit(metric) or '—'})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for lg in langs:
        cells = [lg]
        for m in models:
            r = best.filter((pl.col("model") == m) & (pl.col("lang") == lg))
            if r.height == 0:
                cells += ["–", "–", "–"]
                continue
            row = r.row(0, named=True)
            ci = f" [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]" if row["ci_low"] is not None else ""
            cells += [str(row["layer"]), _fmt(row["value"]) + ci, _fmt(row["ratio_en"], 2)]
        if sh is not None:
            r = sh.filter(pl.col("lang") == lg)
            if r.height:
                row = r.row(0, named=True)
                cells += [str(row["layer"]), _fmt(row["shift"]), _fmt(row["shift_ratio_en"], 2)]
            else:
                cells += ["–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _detox_section(detox: pl.DataFrame, english: str) -> list[str]:
    """Markdown lines summarising the detox displacement: per model and language, the layer where the mean
    displacement is most aligned with the English safety direction."""
    ok = detox.filter((pl.col("metric") == "detox_cos_en") & pl.col("value").is_not_null())
    if ok.height == 0:
        return ["## Detox displacement", "", "No detox displacement could be computed (see the log).", ""]
    best = (
        ok.sort(["value", "layer"], descending=[True, False]).group_by(["model", "lang"], maintain_order=True).first()
    )
    wide = detox.filter(pl.col("value").is_not_null()).pivot(
        on="metric", index=["model", "lang", "layer"], values="value", aggregate_function="first"
    )
    lines = [
        "## Detox displacement",
        "",
        f"Mean displacement toxic → neutral of the parallel detox pairs, compared with the {english} safety "
        "direction (mean benign − mean toxic of the safety set). Per model and language, the layer where "
        "their cosine is largest:",
        "",
        "| model | lang | layer | cos with en direction [CI] | projection on en direction | consistency | "
        "cos with own direction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in best.sort(["model", "lang"]).iter_rows(named=True):
        w = wide.filter(
            (pl.col("model") == r["model"]) & (pl.col("lang") == r["lang"]) & (pl.col("layer") == r["layer"])
        )
        wr = w.row(0, named=True) if w.height else {}
        ci = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["ci_low"] is not None else ""
        lines.append(
            f"| {r['model']} | {r['lang']} | {r['layer']} | {_fmt(r['value'])}{ci} | "
            f"{_fmt(wr.get('detox_proj_en'))} | {_fmt(wr.get('detox_consistency'))} | "
            f"{_fmt(wr.get('detox_cos_own'))} |"
        )
    return lines + [""]


def _problems_section(tables: Mapping[str, pl.DataFrame], limit: int = 30) -> list[str]:
    """Markdown lines listing skipped and degraded cells (one line per cell and message)."""
    lines = ["## Skipped and degraded cells", ""]
    found = False
    for name, t in tables.items():
        if t is None or t.height == 0:
            continue
        keys = [c for c in ("model", "base_model", "lang", "layer") if c in t.columns]
        bad = t.filter(pl.col("status") != "ok").unique([*keys, "status", "message"], maintain_order=True)
        if bad.height == 0:
            continue
        found = True
        counts = t.group_by("status").len().sort("status")
        lines.append(
            f"**{name}**: "
            + ", ".join(f"{r['len']} {r['status']}" for r in counts.iter_rows(named=True))
            + " metric rows."
        )
        lines.append("")
        for r in bad.head(limit).iter_rows(named=True):
            who = r.get("model") or f"{r.get('base_model')} → {r.get('aligned_model')}"
            lines.append(f"- {who}, {r['lang']}, layer {r['layer']}: {r['status']} — {r['message']}")
        if bad.height > limit:
            lines.append(f"- … and {bad.height - limit} more (see the table's `status` and `message` columns)")
        lines.append("")
    if not found:
        lines += ["None: every cell was computed on complete data.", ""]
    return lines


def write_separation_report(
    out_dir: str | Path,
    table: pl.DataFrame,
    *,
    shift: pl.DataFrame | None = None,
    detox: pl.DataFrame | None = None,
    figures: Mapping[str, Sequence[str | Path]] | None = None,
    english: str = "en",
    title: str = "Hidden space of safety: per-language separation",
    notes: Sequence[str] = (),
) -> Path:
    """Write ``<out_dir>/separation_report.md`` and return its path.

    Contents: ``notes`` (e.g. the options used), the figures (``figures`` maps a section title to PNG paths, linked
    relative to the report), for each metric of :data:`SUMMARY_METRICS` in the table a per-language summary —
    per model the best layer, the value there with its interval, and ``×en`` = that best value / English's best
    value (:func:`best_layers`), plus, when ``shift`` is given, the layer of the largest aligned − base shift, the
    shift and its ratio to the English shift at that layer — then the detox summary when ``detox`` is given, and
    the skipped and degraded cells.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "separation_report.md"
    models = list(dict.fromkeys(table["model"].to_list())) if table.height else []
    lines = _overview_lines(table, models, english, title, notes)
    if figures:
        lines += _figures_section(figures, out)
    lines += [
        "## Per-language summary",
        "",
        f"Best layer = the layer with the largest value for that language; ×{english} = that value divided by "
        f"{english}'s best value for the same model."
        + (
            f" Shift = aligned − base at the layer where it is largest; its ×{english} divides by the "
            f"{english} shift at the same layer."
            if shift is not None
            else ""
        ),
        "",
    ]
    present = set(table["metric"].to_list()) if table.height else set()
    for metric in SUMMARY_METRICS:
        if metric in present:
            lines += _summary_section(table, shift, metric, models, english)
    if detox is not None:
        lines += _detox_section(detox, english)
    lines += _problems_section({"separation": table, "shift": shift, "detox": detox})
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _overview_lines(
    table: pl.DataFrame, models: list[str], english: str, title: str, notes: Sequence[str]
) -> list[str]:
    """The report's title, the models, languages, layers and PCA fits of ``table``, and the ``notes``."""
    layers = sorted(table["layer"].unique().to_list()) if table.height else []
    langs = [lg for lg in _lang_order(table["lang"].to_list(), english) if lg != "*"] if table.height else []
    lines = [f"# {title}", ""]
    lines.append(
        f"Models: {', '.join(models) or '–'}. Languages: {', '.join(langs) or '–'}. "
        f"Layers: {', '.join(map(str, layers)) or '–'}."
    )
    if table.height:
        fits = sorted(set(table["pca_fit"].drop_nulls().to_list()))
        ks = sorted(set(table["k"].drop_nulls().to_list()))
        lines.append(f"PCA fit: {', '.join(fits)}; components: {', '.join(map(str, ks)) or '–'}.")
    lines.append("")
    for n in notes:
        lines.append(f"- {n}")
    if notes:
        lines.append("")
    return lines


def _figures_section(figures: Mapping[str, Sequence[str | Path]], out: Path) -> list[str]:
    """Markdown lines linking each section's figures relative to the report directory ``out``."""
    lines = ["## Figures", ""]
    for section, paths in figures.items():
        if not paths:
            continue
        lines += [f"### {section}", ""]
        for p in paths:
            rel = os.path.relpath(Path(p).resolve(), out.resolve()).replace(os.sep, "/")
            lines.append(f"![{Path(p).stem}]({rel})")
        lines.append("")
    return lines
