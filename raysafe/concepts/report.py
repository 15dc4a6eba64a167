"""A short Markdown report of the concept analysis: summary tables and links to the figures.

``write_concept_report(tables, out_dir)`` writes ``tables/<name>.parquet`` (and ``<name>.csv`` without the vector
columns) for every table, the figures of
:mod:`raysafe.concepts.plots` under ``figures/``, and ``report.md`` linking them.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from raysafe.concepts.plots import plot_concepts
from raysafe.tables import write_table


def markdown_table(df: pl.DataFrame, digits: int = 3, max_rows: int = 60) -> str:
    """``df`` as a GitHub-flavoured Markdown table (floats rounded to ``digits``; at most ``max_rows`` rows, the
    number left out noted below)."""
    if df.height == 0:
        return "_(no rows)_\n"

    def cell(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.head(max_rows).iter_rows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    if df.height > max_rows:
        lines.append(f"\n_{df.height - max_rows} more rows in the table file._")
    return "\n".join(lines) + "\n"


def _links(paths: list[Path], root: Path) -> str:
    return "\n".join(f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in paths) + "\n"


def recognition_overview(recognition_best: pl.DataFrame) -> pl.DataFrame:
    """Concept x language table of test accuracy at the layer chosen on train data."""
    if recognition_best.height == 0:
        return recognition_best
    return recognition_best.pivot(on="lang", index="concept", values="test_acc_at_train_selected_layer").sort("concept")


def consistency_overview(summary: pl.DataFrame) -> pl.DataFrame:
    """Per concept: mean over language pairs of the max-over-layers cosine and of the cosine at the concept's
    selected layer."""
    return (
        summary.group_by("concept")
        .agg(
            mean_max_cosine=pl.col("max_cosine").mean(),
            mean_cosine_at_concept_layer=pl.col("cosine_at_concept_layer").mean(),
            n_pairs=pl.len(),
        )
        .sort("concept")
    )


def write_concept_report(
    tables: dict[str, pl.DataFrame],
    out_dir: str | Path,
    *,
    steering: pl.DataFrame | None = None,
    title: str | None = None,
    judged: pl.DataFrame | None = None,
    generations: pl.DataFrame | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write the tables (Parquet + CSV), the figures (PNG) and ``report.md`` into ``out_dir``; returns the report
    path. ``steering`` / ``judged`` / ``generations`` are the steering stage's tables (optional); ``notes`` are
    lines placed under the title (e.g. what the flow did)."""
    root = Path(out_dir)
    (root / "tables").mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        write_table(df, root / "tables", name)
    extra = {"steering": steering, "steering_judged": judged, "steering_generations": generations}
    for name, df in extra.items():
        if df is not None:
            write_table(df, root / "tables", name)
    figs = plot_concepts(tables, root / "figures", steering=steering, judged=judged)
    models = sorted(set(tables["recognition"]["model"].to_list())) or ["(no layers analysed)"]
    parts = [f"# {title or 'Multilingual value concepts — ' + ', '.join(models)}\n"]
    parts.extend(f"{line}\n" for line in notes or [])
    parts.append(
        "Concept vectors are differences of class means (or the configured method) of the positive and negative "
        "sides of each pair; a test pair is recognised when its positive side projects higher. Layers are chosen "
        "on train data only (cross-validation within the train split); the test-selected figure is optimistic.\n"
    )
    parts += _analysis_sections(tables, figs, root)
    parts += _steering_sections(steering, judged, generations, figs, root)
    parts.append("\n## Status\n")
    parts.append(markdown_table(tables["status"].drop("model")))
    names = list(tables) + [n for n, df in extra.items() if df is not None]
    parts.append(
        "\nTables (Parquet; CSV beside each, without vector columns): "
        + ", ".join(f"[{n}](tables/{n}.parquet)" for n in names)
        + "\n"
    )
    path = root / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _analysis_sections(tables: dict[str, pl.DataFrame], figs: dict[str, list[Path]], root: Path) -> list[str]:
    """The report's recognition, consistency, distance and transfer sections."""
    parts: list[str] = []
    parts.append("## Recognition\n")
    parts.append(
        "Test accuracy at the layer chosen on train data:\n\n"
        + markdown_table(recognition_overview(tables["recognition_best"]))
    )
    parts.append(
        "\nPer language, with the layer chosen on test data (optimistic, as reported in the paper):\n\n"
        + markdown_table(tables["recognition_best"].drop("model"))
    )
    parts.append(
        "\nLayer per concept (best mean train-CV accuracy over languages):\n\n"
        + markdown_table(tables["concept_layers"].drop("model"))
    )
    parts.append(_links(figs.get("recognition", []), root))
    parts.append("\n## Cross-lingual consistency\n")
    parts.append(markdown_table(consistency_overview(tables["consistency_summary"])))
    parts.append(_links(figs.get("similarity", []) + figs.get("consistency_curve", []), root))
    parts.append("\n## Similarity and linguistic distance\n")
    parts.append(
        "Correlation of concept-vector similarity with 1 − URIEL distance, over language pairs:\n\n"
        + markdown_table(tables["distance_correlation"].filter(pl.col("concept") == "mean").drop("model"))
    )
    parts.append(_links(figs.get("similarity_vs_distance", []), root))
    parts.append("\n## Transfer\n")
    parts.append(
        "acc(A→B) − acc(B→B) at each concept's selected layer; asymmetry between high- and low-resource "
        "languages:\n\n" + markdown_table(tables["transfer_asymmetry"].drop("model"))
    )
    parts.append(_links(figs.get("transfer", []), root))
    if figs.get("transfer_max"):
        parts.append(
            "\nThe paper's matrix beside it (`transfer_max`): max over layers of acc(A→B) − max over layers of "
            "acc(B→B), layers chosen on the test pairs:\n"
        )
        parts.append(_links(figs["transfer_max"], root))
    return parts


def _steering_sections(
    steering: pl.DataFrame | None,
    judged: pl.DataFrame | None,
    generations: pl.DataFrame | None,
    figs: dict[str, list[Path]],
    root: Path,
) -> list[str]:
    """The report's steering section and its generations under steering (none without steering tables)."""
    parts: list[str] = []
    if steering is not None:
        parts.append("\n## Cross-lingual control (steering)\n")
        parts.append(
            "The source language's concept vector times α is added after the steered layer(s) at every "
            "non-pad position. projection_shift: change of the mean last-token projection of held-out pairs "
            "on the target language's concept direction at the probe layer (projection_shift_in_gaps: the same in units of the "
            "unsteered gap between the positive and negative sides); behaviour_shift: change of the "
            "mean per-token log-prob of the positive minus the negative side; perplexity_ratio: perplexity "
            "of neutral text relative to α = 0.\n"
        )
        shown = [
            c
            for c in (
                "concept",
                "layers",
                "lang",
                "alpha",
                "probe_layer",
                "projection_shift",
                "projection_shift_in_gaps",
                "behaviour_score",
                "behaviour_shift",
                "perplexity",
                "perplexity_ratio",
            )
            if c in steering.columns
        ]
        parts.append(markdown_table(steering.select(shown), max_rows=80))
        parts.append(_links(figs.get("steering", []), root))
    if judged is not None and judged.height:
        parts.append("\n### Generations under steering (probe judge)\n")
        parts.append(
            "Share of greedy continuations of held-out positive sides that the probe judge marks as "
            "exhibiting the concept (a representation probe on the unsteered model, not a safety "
            "classifier):\n\n" + markdown_table(judged.drop("model", strict=False))
        )
        parts.append(_links(figs.get("steering_judged", []), root))
        if generations is not None and generations.height:
            sample = (
                generations.sort(["concept", "lang", "alpha"])
                .group_by(["concept", "lang", "alpha"], maintain_order=True)
                .head(1)
            )
            parts.append(
                "\nOne continuation per (concept, language, α):\n\n"
                + markdown_table(
                    sample.select("concept", "lang", "alpha", "prompt", "continuation", "judged_concept"), max_rows=40
                )
            )
    return parts
