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

import numpy as np
import polars as pl

from raysafe.atomic import atomic_write_bytes
from raysafe.config import ModelSpec
from raysafe.study.measures import HEADLINE_MEASURES, claims
from raysafe.tables import write_table

SEPARATION_METRICS = ("probe_accuracy", "silhouette_euclidean", "bhattacharyya")
HEAD_MONITOR = (
    "head/bias_share",
    "head/w_rank1",
    "head/rank1_z",
    "head/rank1_h",
    "head/absorbing",
    "mlc_metrics_step",
)
ROLE_ORDER = ("base", "control", "mlc")


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


def _per_language_table(base: ModelSpec, models: list[str], stages: dict) -> pl.DataFrame:
    """(model, lang) rows: safety with its interval, separation shift per metric, concept recognition, and the
    safety change against the base model."""
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

    return table


def _per_model_table(base: ModelSpec, models: list[str], stages: dict) -> pl.DataFrame:
    """One row per model: evaluation summary, concept consistency, MLC weight and the MLC head monitor."""
    summary: dict[str, dict[str, Any]] = {m: {"model": m} for m in models}
    sums = _evaluation_table(stages, "summary")
    if sums is not None:
        for r in sums.iter_rows(named=True):
            model = _match(r["model"], models)
            if model:
                summary[model].update(
                    {k: r.get(k) for k in ("mean", "variance_pp2", "agreement", "utility_accuracy") if k in r}
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
                metrics = stages[which].get("metrics") or {}
                for k in HEAD_MONITOR:  # the MLC head monitor at the last step (raysafe.train.mlc.head_monitor)
                    if k in metrics:
                        summary[model][k.replace("/", "_")] = metrics[k]
    return pl.DataFrame(list(summary.values()))


def build_tables(cfg, base: ModelSpec, trained: list[ModelSpec], stages: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    models = [base.label] + [m.label for m in trained]
    return _per_language_table(base, models, stages), _per_model_table(base, models, stages)


def _match(name: str, models: list[str]) -> str | None:
    """Map a label used by a stage back to the study's model label."""
    if name in models:
        return name
    for m in models:
        if name.endswith(m) or m.endswith(name):
            return m
    return None


def _report_figures(table: pl.DataFrame, stages: dict, out: Path) -> list[tuple[str, Path]]:
    """(title, path) of the safety-before-and-after bars and the held-out consistency-by-layer figure."""
    from raysafe.plots import per_language_bars

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
    return figures


def _stage_links(stages: dict, out: Path) -> list[str]:
    """The report's last section: each stage's report, output directory or checkpoint."""
    lines = ["## Stage reports", ""]
    for name, info in stages.items():
        rep = info.get("report")
        if rep:
            lines.append(f"- {name}: [{Path(rep).name}]({_rel(Path(rep), out)})")
        elif info.get("output_dir"):
            lines.append(f"- {name}: `{info['output_dir']}`")
        elif info.get("checkpoint_dir"):
            lines.append(f"- {name}: checkpoint `{info['checkpoint_dir']}`")
    return lines


def write_study_report(cfg, base: ModelSpec, trained: list[ModelSpec], stages: dict) -> dict[str, Any]:
    out = cfg.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    table, summary = build_tables(cfg, base, trained, stages)
    paths = {}
    for name, df in (("per_language", table), ("per_model", summary)):
        paths[name] = write_table(df, out, name)[0]
    figures = _report_figures(table, stages, out)
    heat = [Path(p) for p in stages.get("separation_after", {}).get("figures", []) if "shift" in Path(p).name]
    headline, hpaths = _headline(cfg, base, trained, stages, out)
    paths.update(hpaths)
    lines = [
        f"# Study: {base.label} before and after MLC alignment",
        "",
        f"Config: `{cfg.root / 'study_config.yaml'}`. Models: "
        + ", ".join(f"`{m}`" for m in summary["model"].to_list())
        + ".",
        "",
        *headline,
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
    lines += _stage_links(stages, out)
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode("utf-8"))
    return {
        "report": str(report),
        "table": str(paths["per_language"]),
        "per_model": str(paths["per_model"]),
        "figures": [str(p) for _, p in figures] + [str(p) for k, p in hpaths.items() if k.endswith("figure")],
    }


def _headline(cfg, base: ModelSpec, trained: list[ModelSpec], stages: dict, out: Path) -> tuple[list[str], dict]:
    """The report's first section: per language, base / control / MLC with 95 % intervals and the paired MLC −
    control difference, for the safety rate and the held-out consistency measures, and in words which differences
    are distinguishable from zero."""
    roles = {"base": base.label, **{m.label.removeprefix(f"{base.label}-"): m.label for m in trained}}
    info = stages.get("consistency") or {}
    langs = info.get("languages") or cfg.train_config("mlc", base).mixture.languages
    lines = ["## Headline: MLC against its control", ""]
    paths: dict[str, Path] = {}
    safety = safety_headline(stages, roles, list(langs))
    said: list[str] = []
    if safety is not None:
        display, numbers = safety
        paths["safety_differences"] = write_table(numbers, out, "safety_differences")[0]
        lines += [
            "Safety rate on the held-out harmful prompts (first judge, first evaluation set), 95 % bootstrap "
            "intervals; the differences are paired over the same prompts.",
            "",
            markdown(display),
            "",
        ]
        said += safety_claims(display)
    else:
        numbers = None
    if info:
        layer = info["mlc_layer"]
        lines += [
            f"Held-out cross-lingual consistency at the MLC layer {layer} (last prompt token, prompts of the "
            f"`{cfg.consistency_split}` split, each language against `{info.get('anchor', 'en')}`), 95 % bootstrap "
            "intervals over prompts; raw-state cosine is left out of the headline: it is ~0.99 for any model "
            "(consistency/consistency.csv has it).",
            "",
        ]
        for measure in HEADLINE_MEASURES:
            table = consistency_headline(stages, measure)
            if table is not None:
                lines += [f"**{measure}**", "", markdown(table), ""]
        diffs = _read(info.get("differences"))
        if diffs is not None:
            said += claims(diffs)
    if said:
        lines += ["What is and is not distinguishable from zero:", ""] + [f"- {s}" for s in said] + [""]
    fig = _difference_figure(numbers, stages, out / "mlc_minus_control.png")
    if fig is not None:
        paths["difference_figure"] = fig
        lines += [f"![MLC − control]({fig.name})", ""]
    return lines, paths


def _rel(p: Path, start: Path) -> str:
    import os

    return os.path.relpath(p, start)


def _consistency_figure(cons: pl.DataFrame, mlc_layer: int, path: Path) -> Path:
    """Per layer and model: the movable measures (mean over languages) beside the saturated raw cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, m.replace("_", " ")) for m in HEADLINE_MEASURES] + [("raw_cosine", "raw cosine (saturated)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (measure, label) in zip(axes, panels):
        part = cons.filter(pl.col("measure") == measure).group_by(["role", "layer"]).agg(pl.col("value").mean())
        for (role,), sub in part.sort("layer").group_by(["role"], maintain_order=True):
            ax.plot(sub["layer"], sub["value"], marker="o", ms=3, label=role)
        ax.axvline(mlc_layer, color="grey", ls="--", lw=1)
        ax.set_xlabel("layer (dashed: MLC layer)")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out prompts: cross-language consistency of last-prompt-token states (mean over languages)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ the headline
def _cell(v: float | None, lo: float | None = None, hi: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _outcome_matrix(frame: pl.DataFrame, langs: list[str], groups: list[str]) -> np.ndarray:
    li, gi = {x: i for i, x in enumerate(langs)}, {g: i for i, g in enumerate(groups)}
    X = np.full((len(langs), len(groups)), np.nan)
    for lang, group, safe in frame.select("lang", "group_id", "safe").iter_rows():
        if lang in li and group in gi:
            X[li[lang], gi[group]] = safe
    return X


def safety_headline(stages: dict, roles: dict[str, str], langs: list[str]) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """``(display, differences)``: per language, the safety rate of each role with its interval (the evaluation's
    own) and the paired differences MLC − control and control − base over the same prompts (first judge, first
    set); ``differences`` holds the numbers (comparison, lang, difference, ci_low, ci_high, excludes_zero)."""
    from raysafe.bootstrap import paired_rate_differences
    from raysafe.evaluate.flow import safety_outcomes

    table = _evaluation_table(stages, "per_language")
    if table is None or not table.height:
        return None
    judge, set_name = table["judge"][0], table["set"][0]
    where = {"base": "evaluate_before", "mlc": "evaluate_after", "control": "evaluate_after"}
    outcomes, rates = {}, {}
    for role, label in roles.items():
        stage = stages.get(where[role])
        model = _match(label, table["model"].unique().to_list()) if stage else None
        if model is None:
            continue
        outcomes[role] = safety_outcomes(stage["output_dir"], model, judge, set_name)
        rates[role] = {r["lang"]: r for r in table.filter(pl.col("model") == model).iter_rows(named=True)}
    if not rates:
        return None
    groups = sorted({g for f in outcomes.values() for g in f["group_id"].to_list()})
    mats = {r: _outcome_matrix(f, langs, groups) for r, f in outcomes.items()}
    diffs, numbers = {}, []
    for a, b in (("mlc", "control"), ("control", "base")):
        if a in mats and b in mats:
            found = paired_rate_differences(mats[a], mats[b], langs)
            diffs[f"{a} − {b}"] = {d["lang"]: d for d in found}
            numbers += [{"comparison": f"{a} − {b}", **d} for d in found]
    rows = []
    for lang in langs:
        row: dict[str, Any] = {"lang": lang}
        for role in ROLE_ORDER:
            r = rates.get(role, {}).get(lang)
            row[role] = _cell(r["value"], r["ci_low"], r["ci_high"]) if r else "–"
        for name, by_lang in diffs.items():
            d = by_lang.get(lang)
            row[name] = _cell(d["difference"], d["ci_low"], d["ci_high"]) if d else "–"
            row[f"{name} ≠ 0"] = ("yes" if d["excludes_zero"] else "no") if d else "–"
        rows.append(row)
    return pl.DataFrame(rows), pl.DataFrame(numbers)


def consistency_headline(stages: dict, measure: str) -> pl.DataFrame | None:
    """Per language at the MLC layer: the measure for each role with its interval, and MLC − control."""
    info = stages.get("consistency") or {}
    cons, diffs = _read(info.get("table")), _read(info.get("differences"))
    if cons is None or diffs is None or not cons.height:
        return None
    at = cons.filter((pl.col("layer") == info["mlc_layer"]) & (pl.col("measure") == measure))
    d = diffs.filter((pl.col("measure") == measure) & (pl.col("comparison") == "mlc − control"))
    rows = []
    for lang in at["lang"].unique(maintain_order=True).to_list():
        row: dict[str, Any] = {"lang": lang}
        for role in ROLE_ORDER:
            r = at.filter((pl.col("role") == role) & (pl.col("lang") == lang))
            row[role] = _cell(r["value"][0], r["ci_low"][0], r["ci_high"][0]) if r.height else "–"
        r = d.filter(pl.col("lang") == lang)
        row["mlc − control"] = _cell(r["difference"][0], r["ci_low"][0], r["ci_high"][0]) if r.height else "–"
        row["≠ 0"] = ("yes" if r["excludes_zero"][0] else "no") if r.height else "–"
        rows.append(row)
    return pl.DataFrame(rows)


def safety_claims(table: pl.DataFrame) -> list[str]:
    out = []
    for name in ("mlc − control", "control − base"):
        col = f"{name} ≠ 0"
        if col not in table.columns:
            continue
        yes = table.filter(pl.col(col) == "yes")["lang"].to_list()
        no = table.filter(pl.col(col) == "no")["lang"].to_list()
        out.append(
            f"safety rate, {name}: "
            + (f"distinguishable from 0 (95 % interval excludes it) in {', '.join(yes)}" if yes else "")
            + ("; " if yes and no else "")
            + (f"not distinguishable from 0 in {', '.join(no)}" if no else "")
            + "."
        )
    return out


def _difference_figure(safety: pl.DataFrame | None, stages: dict, path: Path) -> Path | None:
    """MLC − control per language with 95 % intervals: safety rate and the headline consistency measures."""
    info = stages.get("consistency") or {}
    diffs = _read(info.get("differences"))
    frames = []
    if safety is not None and safety.height:
        frames.append(("safety rate", safety.filter(pl.col("comparison") == "mlc − control")))
    if diffs is not None and diffs.height:
        for measure in HEADLINE_MEASURES:
            sub = diffs.filter((pl.col("measure") == measure) & (pl.col("comparison") == "mlc − control"))
            frames.append((measure.replace("_", " "), sub))
    panels: list[tuple[str, list[str], np.ndarray, np.ndarray, np.ndarray]] = []
    for title, d in frames:
        d = d.filter(pl.col("difference").is_not_nan())
        if d.height:
            panels.append(
                (
                    title,
                    d["lang"].to_list(),
                    d["difference"].to_numpy(),
                    d["ci_low"].to_numpy(),
                    d["ci_high"].to_numpy(),
                )
            )
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (title, langs, v, lo, hi) in zip(axes[0], panels):
        x = np.arange(len(langs))
        excl = (lo > 0) | (hi < 0)
        ax.errorbar(x, v, yerr=[v - lo, hi - v], fmt="none", ecolor="grey", capsize=3)
        ax.scatter(x, v, c=np.where(excl, "tab:red", "tab:blue"), zorder=3, s=18)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, langs, fontsize=8)
        ax.set_title(f"MLC − control: {title}", fontsize=10)
    fig.suptitle("paired differences with 95 % bootstrap intervals (red: interval excludes 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
