"""The study's before/after report: what alignment with MLC changed, per language, read from the stages' outputs.

Tables (Parquet + CSV under ``<output_dir>/report/``):

* ``per_language``: lang × model — safety rate (first judge, first set) with its interval, the change against the
  base model, the separation shift of the trained model at the layer where the base separates that language best
  (probe accuracy, silhouette, Bhattacharyya), and concept recognition accuracy;
* ``per_model``: model — mean safety over languages, variance across languages, cross-language agreement, utility,
  held-out rank-1 energy and mean cross-language cosine at the MLC layer, mean cross-lingual concept cosine.

Figures: per-language safety bars before/after, held-out consistency by layer, and the separation shift heatmap of
the separation stage linked in place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl

from raysafe.atomic import atomic_write_bytes
from raysafe.config import ModelSpec
from raysafe.tables import write_table

SEPARATION_METRICS = ("probe_accuracy", "silhouette_euclidean", "bhattacharyya")


def markdown(df: pl.DataFrame, digits: int = 3) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.iter_rows()]
    return "\n".join([head, sep, *rows])


def _read(path: str | None) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path and Path(path).exists() else None


def _evaluation_table(stages: dict, key: str) -> pl.DataFrame | None:
    """An evaluation table (``per_language`` or ``summary``) of the before and after stages, for the first judge and
    the first set."""
    frames = [
        _read(stages[s]["paths"].get(f"{key}_parquet")) for s in ("evaluate_before", "evaluate_after") if s in stages
    ]
    frames = [f for f in frames if f is not None and f.height]
    if not frames:
        return None
    df = pl.concat(frames, how="diagonal_relaxed")
    return df.filter((pl.col("judge") == df["judge"][0]) & (pl.col("set") == df["set"][0]))


def _separation_shift(stages: dict) -> pl.DataFrame | None:
    """Per (aligned model, lang, metric) the shift at the layer where the base model scores that language best."""
    info = stages.get("separation_after")
    if not info:
        return None
    shift = _read(info["tables"].get("shift"))
    if shift is None or not shift.height:
        return None
    shift = shift.filter(pl.col("metric").is_in(SEPARATION_METRICS) & pl.col("shift").is_not_null())
    best = (
        shift.sort("base_value", descending=True, nulls_last=True)
        .group_by(["aligned_model", "lang", "metric"], maintain_order=True)
        .first()
    )
    return best.select("aligned_model", "lang", "metric", "layer", "shift")


def build_tables(cfg, base: ModelSpec, trained: list[ModelSpec], stages: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    models = [base.label] + [m.label for m in trained]
    langs: list[str] = []
    per_lang: dict[tuple[str, str], dict[str, Any]] = {}

    def row(model: str, lang: str) -> dict[str, Any]:
        if lang not in langs:
            langs.append(lang)
        return per_lang.setdefault((model, lang), {"model": model, "lang": lang})

    safety = _evaluation_table(stages, "per_language")
    if safety is not None:
        for r in safety.iter_rows(named=True):
            model = _match(r["model"], models)
            if model:
                row(model, r["lang"]).update(
                    safety=r["value"], safety_ci_low=r["ci_low"], safety_ci_high=r["ci_high"], n_prompts=r["n_prompts"]
                )
    shift = _separation_shift(stages)
    if shift is not None:
        for r in shift.iter_rows(named=True):
            model = _match(r["aligned_model"], models)
            if model:
                row(model, r["lang"])[f"shift_{r['metric']}"] = r["shift"]
    for phase in ("concepts_before", "concepts_after"):
        for name, m in (stages.get(phase, {}).get("models") or {}).items():
            model = _match(name, models)
            for lang, acc in (m.get("recognition_by_lang") or {}).items():
                if model:
                    row(model, lang)["concept_recognition"] = acc
    table = pl.DataFrame([per_lang[(m, lg)] for lg in langs for m in models if (m, lg) in per_lang])
    if table.height and "safety" in table.columns:
        base_safety = table.filter(pl.col("model") == base.label).select("lang", pl.col("safety").alias("_b"))
        table = (
            table.join(base_safety, on="lang", how="left")
            .with_columns((pl.col("safety") - pl.col("_b")).alias("safety_change"))
            .drop("_b")
        )

    # ---- per model
    summary: dict[str, dict[str, Any]] = {m: {"model": m} for m in models}
    sums = _evaluation_table(stages, "summary")
    if sums is not None:
        for r in sums.iter_rows(named=True):
            model = _match(r["model"], models)
            if model:
                summary[model].update(
                    {k: r.get(k) for k in ("mean", "variance_pp2", "agreement", "utility_accuracy") if k in r}
                )
    cons = _read(stages.get("consistency", {}).get("table"))
    if cons is not None:
        layer = stages["consistency"]["mlc_layer"]
        for r in cons.filter(pl.col("layer") == layer).iter_rows(named=True):
            if r["model"] in summary:
                summary[r["model"]].update(
                    {f"rank1_energy_L{layer}": r["rank1_energy"], f"mean_cosine_L{layer}": r["mean_cosine"]}
                )
    for phase in ("concepts_before", "concepts_after"):
        for name, m in (stages.get(phase, {}).get("models") or {}).items():
            model = _match(name, models)
            if model:
                summary[model]["concept_cosine"] = (m.get("headline") or {}).get("consistency.mean_max_cosine")
    for which in ("train_mlc", "train_control"):
        if which in stages:
            model = f"{base.label}-{which.split('_')[1]}"
            if model in summary:
                summary[model]["mlc_weight"] = stages[which].get("mlc_weight")
    return table, pl.DataFrame(list(summary.values()))


def _match(name: str, models: list[str]) -> str | None:
    """Map a label used by a stage back to the study's model label."""
    if name in models:
        return name
    for m in models:
        if name.endswith(m) or m.endswith(name):
            return m
    return None


def write_study_report(cfg, base: ModelSpec, trained: list[ModelSpec], stages: dict) -> dict[str, Any]:
    from raysafe.plots import per_language_bars

    out = cfg.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    table, summary = build_tables(cfg, base, trained, stages)
    paths = {}
    for name, df in (("per_language", table), ("per_model", summary)):
        paths[name] = write_table(df, out, name)[0]
    figures: list[tuple[str, Path]] = []
    if table.height and "safety" in table.columns:
        bars = table.filter(pl.col("safety").is_not_null())
        figures.append(
            (
                "Safety rate per language, before and after",
                per_language_bars(
                    bars,
                    out / "safety_before_after.png",
                    value="safety",
                    lo="safety_ci_low",
                    hi="safety_ci_high",
                    title="safety rate per language (95% bootstrap CI)",
                    ylabel="safety rate",
                ),
            )
        )
    cons = _read(stages.get("consistency", {}).get("table"))
    if cons is not None:
        figures.append(
            (
                "Held-out cross-lingual consistency by layer",
                _consistency_figure(cons, stages["consistency"]["mlc_layer"], out / "consistency_by_layer.png"),
            )
        )
    heat = [Path(p) for p in stages.get("separation_after", {}).get("figures", []) if "shift" in Path(p).name]
    lines = [
        f"# Study: {base.label} before and after MLC alignment",
        "",
        f"Config: `{cfg.root / 'study_config.yaml'}`. Models: "
        + ", ".join(f"`{m}`" for m in summary["model"].to_list())
        + ".",
        "",
        "## Per model",
        "",
        markdown(summary),
        "",
        "## Per language",
        "",
        "`safety_change` is against the base model; `shift_*` is the trained model minus the base at the layer "
        "where the base separates that language best (separation stage); `concept_recognition` is the "
        "concept test accuracy at the train-selected layer, mean over concepts.",
        "",
        markdown(table) if table.height else "(no per-language results)",
        "",
    ]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    for p in heat:
        lines += [f"## Separation shift: {p.stem}", "", f"![{p.stem}]({_rel(p, out)})", ""]
    lines += ["## Stage reports", ""]
    for name, info in stages.items():
        rep = info.get("report")
        if rep:
            lines.append(f"- {name}: [{Path(rep).name}]({_rel(Path(rep), out)})")
        elif info.get("output_dir"):
            lines.append(f"- {name}: `{info['output_dir']}`")
        elif info.get("checkpoint_dir"):
            lines.append(f"- {name}: checkpoint `{info['checkpoint_dir']}`")
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    return {
        "report": str(report),
        "table": str(paths["per_language"]),
        "per_model": str(paths["per_model"]),
        "figures": [str(p) for _, p in figures],
    }


def _rel(p: Path, start: Path) -> str:
    import os

    return os.path.relpath(p, start)


def _consistency_figure(cons: pl.DataFrame, mlc_layer: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, col, label in ((axes[0], "rank1_energy", "rank-1 energy σ₁²/Σσ²"), (axes[1], "mean_cosine", "mean cosine")):
        for (model,), part in cons.sort("layer").group_by(["model"], maintain_order=True):
            ax.plot(part["layer"], part[col], marker="o", ms=3, label=model)
        ax.axvline(mlc_layer, color="grey", ls="--", lw=1)
        ax.set_xlabel("layer (dashed: MLC layer)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out prompts: cross-language consistency of last-prompt-token states")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
