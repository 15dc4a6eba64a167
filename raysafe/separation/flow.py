"""The separation flow ("hidden space of safety"): activations of a base model and its aligned counterpart →
per-language separation tables, alignment shift, detox displacement → figures, report, MLflow.

``run_separation(cfg)`` is what ``raysafe separation``, ``jobs/separation.py`` and the tests call. Stages:

1. **activations** — for the safety set (toxic / benign texts) and the parallel detox pairs, the extraction flow's
   :func:`~raysafe.extract.flow.ensure_activations`: reused only when each model's stored identity (weights and
   texts fingerprints, vector-shaping settings) is current, else extracted, resumed or redone; the identities are
   written to ``<output_dir>/activations.json`` with the analysis identity (config ⊕ activations identities) and
   to the MLflow params, so every table names what it came from;
2. **separation** — :func:`~raysafe.separation.tables.analyse_separation`, one layer of one model in memory
   at a time;
3. **alignment shift** — aligned − base per (language, layer, metric) for each aligned model, and each language
   relative to English;
4. **detox displacement** — per language, the toxic → neutral displacement against the English safety direction;
5. **figures and report** — PCA scatter per language (models side by side), layer curves, shift heatmaps,
   ``separation_report.md``.

Each table is written (Parquet + CSV, under ``<output_dir>/tables``) as soon as its stage ends, so a failure in a
later stage loses nothing computed before it; everything goes to one MLflow run as metrics (per layer as the step)
and artifacts. Bad cells (one class, too few items, NaN vectors, layers missing on one side) are marked in the
tables' ``status``/``message`` columns and listed in the report; the rest of the analysis completes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_json
from raysafe.config import (
    SourceSpec,
    dump_config,
)
from raysafe.errors import ConfigError
from raysafe.extract.config import ExtractConfig
from raysafe.extract.flow import Activations, ActivationStore
from raysafe.identity import analysis_identity
from raysafe.separation.config import ModelFamily, SeparationConfig
from raysafe.separation.metrics import shrinkage_label
from raysafe.separation.tables import (
    ReadLayer,
    alignment_shift,
    analyse_separation,
    detox_displacement,
    pca_scatter_points,
)
from raysafe.tables import write_table

log = logging.getLogger(__name__)

#: Metrics shown in :meth:`SeparationResult.summary` (when computed), with their short column titles.
SUMMARY_COLUMNS: dict[str, str] = {
    "bhattacharyya": "Bhattacharyya",
    "probe_accuracy": "probe acc.",
    "silhouette_euclidean": "silhouette",
    "between_var_ratio": "between-var",
}


# ================================================================================================== result
@dataclass
class SeparationResult:
    """What a separation run produced: the tables (also on disk), output paths, and the MLflow run."""

    output_dir: Path
    models: list[str]
    aligned: list[str]
    layers: list[int]
    languages: list[str]
    position: str
    english: str
    table: pl.DataFrame
    shift: pl.DataFrame | None = None
    detox: pl.DataFrame | None = None
    best: pl.DataFrame | None = None
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    report: Path | None = None
    extracted: dict[str, bool] = field(default_factory=dict)
    activations: dict[str, dict] = field(default_factory=dict)  # data set → store and each model's identity
    identity: str | None = None  # digest of the config and the activations' identities
    problems: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    @property
    def status_counts(self) -> dict[str, int]:
        """Metric rows per status across the separation, shift and detox tables."""
        counts: dict[str, int] = {}
        for t in (self.table, self.shift, self.detox):
            if t is not None and t.height:
                for r in t.group_by("status").len().iter_rows(named=True):
                    counts[r["status"]] = counts.get(r["status"], 0) + r["len"]
        return counts

    def _detox_only_languages(self) -> list[str]:
        """Languages of the detox pairs that the safety set lacks (they get a detox column only)."""
        if self.detox is None or self.detox.height == 0:
            return []
        return sorted(set(self.detox["lang"].to_list()) - set(self.languages) - {"*"})

    def summary(self) -> str:
        """A short per-language text summary and where the outputs are."""
        lines = [
            f"separation of {', '.join(self.models)} (position {self.position}, layers "
            f"{_ranges(self.layers)}, {len(self.languages)} languages)"
        ]
        best = self.best if self.best is not None else pl.DataFrame()
        metrics = [m for m in SUMMARY_COLUMNS if best.height and m in set(best["metric"].to_list())]
        detox_best = _detox_best(self.detox)
        for model in self.models:
            head = ["lang"] + [SUMMARY_COLUMNS[m] for m in metrics]
            if detox_best is not None:
                head.append(f"detox cos({self.english})")
            rows = [head]
            for lg in self.languages + self._detox_only_languages():
                cells = [lg]
                for m in metrics:
                    r = best.filter((pl.col("model") == model) & (pl.col("metric") == m) & (pl.col("lang") == lg))
                    cells.append(f"{r['value'][0]:.3f} @L{r['layer'][0]}" if r.height else "–")
                if detox_best is not None:
                    r = detox_best.filter((pl.col("model") == model) & (pl.col("lang") == lg))
                    cells.append(f"{r['value'][0]:.3f} @L{r['layer'][0]}" if r.height else "–")
                rows.append(cells)
            lines.append(f"{model} — best value per metric and its layer:")
            lines += _aligned_text(rows)
        if self.shift is not None and self.shift.height:
            lines += _shift_text(self.shift, self.english)
        counts = self.status_counts
        lines.append(
            "metric rows: "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + ("  (see the report's last section)" if set(counts) - {"ok"} else "")
        )
        for p in self.problems:
            lines.append(f"problem: {p}")
        lines.append(f"tables:  {self.output_dir / 'tables'}  ({', '.join(sorted(self.tables))})")
        lines.append(f"figures: {self.output_dir / 'figures'}  ({len(self.figures)} PNG)")
        if self.report:
            lines.append(f"report:  {self.report}")
        ran = [k for k, v in self.extracted.items() if v]
        lines.append("activations: " + (f"extracted now for {', '.join(ran)}" if ran else "reused from the store"))
        if self.mlflow_run_id:
            lines.append(f"MLflow run {self.mlflow_run_id}")
        return "\n".join(lines)


def _ranges(xs: Sequence[int]) -> str:
    """[0, 1, 2, 5] → '0–2, 5'."""
    out, xs = [], sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}–{xs[j]}" if j > i else str(xs[i]))
        i = j + 1
    return ", ".join(out) or "–"


def _aligned_text(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned text columns, indented."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _detox_best(detox: pl.DataFrame | None) -> pl.DataFrame | None:
    """Per (model, lang), the layer where the detox displacement is most aligned with the English direction."""
    if detox is None or detox.height == 0:
        return None
    ok = detox.filter((pl.col("metric") == "detox_cos_en") & pl.col("value").is_not_null())
    if ok.height == 0:
        return None
    return (
        ok.sort(["value", "layer"], descending=[True, False])
        .group_by(["model", "lang"], maintain_order=True)
        .first()
        .select("model", "lang", "layer", "value")
    )


def _shift_text(shift: pl.DataFrame, english: str) -> list[str]:
    """Per aligned model and language: the largest Bhattacharyya (else first metric) shift, its layer, ×English."""
    metric = "bhattacharyya" if "bhattacharyya" in set(shift["metric"].to_list()) else shift["metric"][0]
    lines = []
    for aligned in dict.fromkeys(shift["aligned_model"].to_list()):
        s = shift.filter(
            (pl.col("aligned_model") == aligned) & (pl.col("metric") == metric) & pl.col("shift").is_not_null()
        )
        if s.height == 0:
            continue
        best = s.sort(["shift", "layer"], descending=[True, False]).group_by("lang", maintain_order=True).first()
        rows = [["lang", f"largest Δ {metric}", "layer", f"× {english} shift (same layer)"]]
        for r in best.sort("lang").iter_rows(named=True):
            ratio = "–" if r["shift_ratio_en"] is None else f"{r['shift_ratio_en']:.2f}"
            rows.append([r["lang"], f"{r['shift']:+.3f}", str(r["layer"]), ratio])
        lines.append(f"alignment shift {aligned} − {s['base_model'][0]}:")
        lines += _aligned_text(rows)
    return lines


# ============================================================================================ activations
def _source_for(which: str, spec: SourceSpec) -> SourceSpec:
    """The source with its contract made explicit where ``auto`` would guess wrong (detox pairs from a file/hub)."""
    if which == "detox" and spec.contract == "auto" and spec.kind != "fixture":
        return spec.model_copy(update={"contract": "parallel_detox"})
    return spec


def extract_config(cfg: SeparationConfig, which: Literal["safety", "detox"]) -> ExtractConfig:
    """The extraction flow's config for one data set of ``cfg``: all models, its source, its store."""
    source = cfg.safety if which == "safety" else cfg.detox
    assert source is not None
    run_name = f"{cfg.tracking.run_name}-extract-{which}" if cfg.tracking.run_name else f"extract-{which}"
    return ExtractConfig(
        models=cfg.models,
        data=_source_for(which, source),
        output_dir=str(cfg.store_dir(which)),
        extract=cfg.extract,
        ray=cfg.ray,
        tracking=cfg.tracking.model_copy(update={"run_name": run_name}),
    )


def ensure_activations(cfg: SeparationConfig, which: Literal["safety", "detox"], progress: bool = True) -> Activations:
    """The activation store of one data set, through the extraction flow's one door (extracted, resumed or redone
    when missing or stale; an OutputError naming what is missing when ``extract_if_missing`` is off)."""
    from raysafe.extract.flow import ensure_activations as ensure

    return ensure(
        extract_config(cfg, which),
        need_layers=None if cfg.layers == "all" else list(cfg.layers),
        extract_if_missing=cfg.extract_if_missing,
        progress=progress,
        what=f"{which} activations",
    )


def family_layers(cfg: SeparationConfig, family: ModelFamily, store: ActivationStore) -> list[int]:
    """The analysed layers of one family: ``cfg.layers``, or the union of the layers stored for its models (layers
    stored for one model only are kept: their cells on the other side are marked skipped). Warns about such
    mismatches, naming the model and the layers."""
    specs = [family.base, *family.aligned]
    per_model = {m.label: set(store.layers(m.label)) for m in specs}
    layers = sorted(set().union(*per_model.values())) if cfg.layers == "all" else list(cfg.layers)
    for label, have in per_model.items():
        lacking = [x for x in layers if x not in have]
        if lacking:
            log.warning(
                "separation: model %r has no activations for layers %s (it has %s): those cells will be marked skipped",
                label,
                _ranges(lacking),
                _ranges(sorted(have)),
            )
    return layers


def _logged_reader(read: Callable, stage: str, total: int) -> ReadLayer:
    """``read`` with one progress line per layer read."""
    state = {"i": 0, "t0": time.perf_counter()}

    def read_layer(model: str, layer: int):
        state["i"] += 1
        log.info(
            "separation [%s]: model %r layer %d (%d/%d, %.0f s)",
            stage,
            model,
            layer,
            state["i"],
            total,
            time.perf_counter() - state["t0"],
        )
        return read(model, layer)

    return read_layer


# ================================================================================================ outputs
def _metric_key(*parts: str) -> str:
    """An MLflow metric name from parts (characters MLflow rejects become '_')."""
    return re.sub(r"[^A-Za-z0-9_.\- /]", "_", ".".join(parts))


def log_layer_metrics(df: pl.DataFrame, value: str, key: Callable[[dict], str]) -> int:
    """Log the finite values of ``df[value]`` to MLflow, one batch per layer (the step); returns how many."""
    ok = df.filter(pl.col(value).is_not_null() & pl.col(value).is_finite())
    n = 0
    for (layer,), part in ok.group_by(["layer"], maintain_order=True):
        metrics = {key(r): r[value] for r in part.iter_rows(named=True)}
        tracking.log_metrics(metrics, step=int(layer))
        n += len(metrics)
    return n


def scatter_layers(cfg: SeparationConfig, family: ModelFamily, table: pl.DataFrame, layers: list[int]) -> list[int]:
    """The layers of one family's scatter plots: ``cfg.scatter_layers``, or the layer where its last model (the
    aligned one when there is one) separates English most by the first of bhattacharyya / ``options.metrics``
    computed (the mean over languages when English is absent)."""
    if cfg.scatter_layers != "best":
        return [x for x in cfg.scatter_layers if x in layers] or layers[-1:]
    order = [
        m for m in ("bhattacharyya", *cfg.options.metrics) if m in cfg.options.metrics and m != "pca_explained_variance"
    ]
    if not order or table.height == 0:
        return layers[-1:]
    model = (family.aligned or [family.base])[-1].label
    ok = table.filter((pl.col("model") == model) & (pl.col("metric") == order[0]) & pl.col("value").is_not_null())
    en = ok.filter(pl.col("lang") == cfg.english)
    src = en if en.height else ok.group_by("layer").agg(pl.col("value").mean())
    if src.height == 0:
        return layers[-1:]
    return [int(src.sort(["value", "layer"], descending=[True, False])["layer"][0])]


# =================================================================================================== flow
def run_separation(cfg: SeparationConfig, progress: bool = True) -> SeparationResult:
    """Run the separation analysis of ``cfg`` (extracting missing activations first); see the module docstring.

    Families (base + aligned models) are analysed one after the other, each on the union of its models' layers,
    one layer of one model in memory at a time."""
    import torch

    threads_before = torch.get_num_threads()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: SeparationConfig, progress: bool) -> SeparationResult:
    """:func:`run_separation` with the thread setting applied."""
    from raysafe.separation.report import best_layers, write_separation_report

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    families = cfg.families
    models = [m.label for m in cfg.models]
    position = cfg.pooled_position

    # ---- 1. activations (extraction logs its own MLflow runs, so it runs before this flow's run starts)
    log.info("separation [1/5]: activations of %s (position %s)", ", ".join(models), position)
    safety = ensure_activations(cfg, "safety", progress)
    detox = ensure_activations(cfg, "detox", progress) if cfg.detox is not None else None
    safety_store, detox_store = safety.store, detox.store if detox is not None else None
    inputs = {"safety": safety.record()} | ({"detox": detox.record()} if detox is not None else {})
    identity = analysis_identity(cfg.model_dump(mode="json"), inputs)
    atomic_write_json(out / "activations.json", {"identity": identity, "activations": inputs})
    layers_of = {f.base.label: family_layers(cfg, f, safety_store) for f in families}
    all_layers = sorted(set().union(*map(set, layers_of.values())))
    if not all_layers:
        raise ConfigError(
            "no layers to analyse",
            where=f"layers / {safety_store.root}",
            fix="extract at least one layer (extract.layers) or list the layers to analyse",
        )
    read_safety = safety_store.reader(position)
    read_detox = detox_store.reader(position) if detox_store is not None else None
    n_reads = sum(len(layers_of[f.base.label]) * (1 + len(f.aligned)) for f in families)

    result = SeparationResult(
        output_dir=out,
        models=models,
        aligned=[m.label for f in families for m in f.aligned],
        layers=all_layers,
        languages=[],
        position=position,
        english=cfg.english,
        table=pl.DataFrame(),
        extracted={"safety": bool(safety.extracted), "detox": detox is not None and bool(detox.extracted)},
        activations=inputs,
        identity=identity,
    )
    tables_dir, fig_dir = out / "tables", out / "figures"
    tags = {"raysafe.flow": "separation", "raysafe.base": ",".join(f.base.label for f in families)}
    with tracking.run(cfg.tracking, "separation", tags=tags) as mlrun:
        if mlrun is not None:
            result.mlflow_run_id = mlrun.info.run_id
        tracking.log_params(
            {
                "config": cfg.model_dump(mode="json"),
                "analysed_layers": _ranges(all_layers),
                "analysis_identity": identity,
                "safety_activations": str(safety_store.root.resolve()),
                "detox_activations": str(detox_store.root.resolve()) if detox_store else "none",
            }
            | safety.params("safety")
            | (detox.params("detox") if detox is not None else {})
        )
        for kind, acts in (("safety", safety), ("detox", detox)):
            if acts is not None:
                acts.log_inputs(kind)
        tracking.log_models_lineage(cfg.models)
        extract_runs = {
            f"raysafe.extract_run.{k}": ",".join(a.mlflow_run_ids)
            for k, a in (("safety", safety), ("detox", detox))
            if a is not None and a.mlflow_run_ids
        }
        if extract_runs:
            tracking.set_tags(extract_runs)

        # ---- 2. separation metrics, one layer of one model at a time
        o = cfg.options
        log.info(
            "separation [2/5]: metrics of %d model(s), %d (model, layer) reads (k = %d, %s PCA, %d bootstrap "
            "resamples)",
            len(models),
            n_reads,
            o.k,
            o.pca_fit,
            o.bootstrap,
        )
        reader = _logged_reader(read_safety, "2/5 metrics", n_reads)
        table = pl.concat(
            [
                analyse_separation(
                    reader, [f.base.label] + [a.label for a in f.aligned], layers_of[f.base.label], o, progress=False
                )
                for f in families
            ]
        )
        result.table = table
        result.languages = sorted(
            (set(table["lang"].to_list()) - {"*"}) if table.height else set(), key=lambda lg: (lg != cfg.english, lg)
        )
        result.tables["separation"] = write_table(table, tables_dir, "separation")[0]
        best = best_layers(table, cfg.english)
        result.best = best
        result.tables["best_layers"] = write_table(best, tables_dir, "best_layers")[0]
        log_layer_metrics(table, "value", lambda r: _metric_key(r["metric"], r["model"], r["lang"]))
        tracking.log_metrics(
            {_metric_key("best", r["metric"], r["model"], r["lang"]): r["value"] for r in best.iter_rows(named=True)}
        )
        tracking.log_metrics(
            {
                _metric_key("best_layer", r["metric"], r["model"], r["lang"]): r["layer"]
                for r in best.iter_rows(named=True)
            }
        )

        # ---- 3. alignment shift
        pairs = [(f.base.label, a.label) for f in families for a in f.aligned]
        if pairs:
            log.info("separation [3/5]: alignment shift of %s", ", ".join(f"{a} − {b}" for b, a in pairs))
            result.shift = pl.concat([alignment_shift(table, b, a, cfg.english) for b, a in pairs])
            result.tables["shift"] = write_table(result.shift, tables_dir, "shift")[0]
            log_layer_metrics(
                result.shift, "shift", lambda r: _metric_key("shift", r["metric"], r["aligned_model"], r["lang"])
            )
        else:
            log.info("separation [3/5]: no aligned model: alignment shift skipped")

        # ---- 4. detox displacement
        if read_detox is not None:
            log.info("separation [4/5]: detox displacement against the %r safety direction", cfg.english)
            dreader = _logged_reader(read_detox, "4/5 detox", n_reads)
            result.detox = pl.concat(
                [
                    detox_displacement(
                        dreader,
                        read_safety,
                        [f.base.label] + [a.label for a in f.aligned],
                        layers_of[f.base.label],
                        cfg.english,
                        options=o,
                        progress=False,
                    )
                    for f in families
                ]
            )
            result.tables["detox"] = write_table(result.detox, tables_dir, "detox")[0]
            log_layer_metrics(result.detox, "value", lambda r: _metric_key(r["metric"], r["model"], r["lang"]))
        else:
            log.info("separation [4/5]: no detox pairs configured: skipped")

        # ---- 5. figures and report
        log.info("separation [5/5]: figures and report")
        figures = _figures(cfg, result, read_safety, fig_dir, layers_of)
        result.report = write_separation_report(
            out,
            table,
            shift=result.shift,
            detox=result.detox,
            figures=figures,
            english=cfg.english,
            notes=_report_notes(cfg, result, safety_store, detox_store),
        )
        tracking.log_metrics(
            {f"cells_{st}": n for st, n in result.status_counts.items()}
            | {
                "n_languages": len(result.languages),
                "n_layers": len(all_layers),
                "seconds": time.perf_counter() - t_start,
            }
        )
        if mlrun is not None:
            tracking.log_artifact(tables_dir, "tables")
            if fig_dir.exists():
                tracking.log_artifact(fig_dir, "figures")
            tracking.log_artifact(result.report)
            tracking.log_artifact(out / "config.yaml")
            tracking.log_artifact(out / "activations.json")
    log.info("separation: done in %.0f s", time.perf_counter() - t_start)
    return result


def _figures(
    cfg: SeparationConfig,
    result: SeparationResult,
    read_safety: ReadLayer,
    fig_dir: Path,
    layers_of: dict[str, list[int]],
) -> dict[str, list[Path]]:
    """Every figure, by report section. A figure that fails is logged and listed in ``result.problems``; the
    tables and the other figures are kept."""
    from raysafe.separation.plots import (
        plot_layer_curves,
        plot_pca_scatter,
        plot_shift_heatmap,
    )

    figures: dict[str, list[Path]] = {}

    def attempt(section: str, what: str, fn: Callable[[], list[Path]]) -> None:
        try:
            paths = fn()
        except Exception as e:  # a plotting failure must not lose the tables written before it
            log.exception("separation: figure %s failed", what)
            result.problems.append(f"figure {what} failed: {type(e).__name__}: {e}")
            return
        figures.setdefault(section, []).extend(paths)
        result.figures.extend(paths)

    metrics = [m for m in cfg.options.metrics if m != "pca_explained_variance"] or list(cfg.options.metrics)
    families = cfg.families
    for fam in families:
        fam_models = [fam.base.label] + [a.label for a in fam.aligned]
        fam_dir = fig_dir if len(families) == 1 else fig_dir / f"scatter_{fam.base.label}"
        fam_table = result.table.filter(pl.col("model").is_in(fam_models))
        for layer in scatter_layers(cfg, fam, fam_table, layers_of[fam.base.label]):

            def scatter(layer=layer, fam_models=fam_models, fam_dir=fam_dir) -> list[Path]:
                pts = pca_scatter_points(
                    read_safety, fam_models, layer, cfg.options, max_points_per_class=cfg.scatter_points_per_class
                )
                write_table(pts, fig_dir / "data", f"scatter_{fam_models[0]}_layer{layer}")
                return plot_pca_scatter(pts, fam_dir, models=fam_models, english=cfg.english)

            title = f"PCA scatter per language, layer {layer}" + (f" ({fam.base.label})" if len(families) > 1 else "")
            attempt(title, f"scatter {fam.base.label} layer {layer}", scatter)
    attempt(
        "Metrics by layer",
        "layer curves",
        lambda: plot_layer_curves(result.table, fig_dir, metrics=metrics, english=cfg.english),
    )
    if result.shift is not None:
        for a in dict.fromkeys(result.shift["aligned_model"].to_list()):
            sub = result.shift.filter(pl.col("aligned_model") == a)
            attempt(
                "Alignment shift (aligned − base)",
                f"shift heatmap {a}",
                lambda sub=sub, a=a: plot_shift_heatmap(
                    sub, fig_dir, metrics=metrics, english=cfg.english, name=f"shift_heatmap_{a}"
                ),
            )
    if result.detox is not None:
        attempt(
            "Detox displacement by layer",
            "detox curves",
            lambda: plot_layer_curves(result.detox, fig_dir, english=cfg.english, prefix="detox_curves"),
        )
    return figures


def _report_notes(
    cfg: SeparationConfig, result: SeparationResult, safety: ActivationStore, detox: ActivationStore | None
) -> list[str]:
    """The settings a reader of the report needs."""
    o = cfg.options
    notes = []
    for f in cfg.families:
        notes.append(
            f"Base model `{f.base.label}` ({f.base.path})"
            + (
                ", aligned: " + ", ".join(f"`{m.label}` ({m.path})" for m in f.aligned)
                if f.aligned
                else "; no aligned model (base-only: no shift tables)"
            )
            + "."
        )
    notes += [
        f"Hidden states: position `{result.position}`, activations in `{safety.root}`"
        + (f" and `{detox.root}`" if detox else "")
        + f" (their identities: `activations.json`; analysis identity {result.identity}).",
        "Weights fingerprints: "
        + ", ".join(
            f"`{m}` {ident['weights']}" for m, ident in result.activations.get("safety", {}).get("models", {}).items()
        )
        + ".",
        f"PCA: k = {o.k}, fitted {o.pca_fit.replace('_', ' ')}; Bhattacharyya covariance shrinkage {shrinkage_label(o.shrinkage)}; "
        f"{o.bootstrap} stratified bootstrap resamples, {o.ci_level:.0%} {o.ci_method} intervals; probe: "
        f"{o.probe_folds}-fold logistic regression (C = {o.probe_C}) on the {o.probe_space} space.",
        "Tables (Parquet + CSV): `tables/` (separation, best_layers"
        + (", shift" if result.shift is not None else "")
        + (", detox" if result.detox is not None else "")
        + ").",
    ]
    return notes + [f"Problem: {p}" for p in result.problems]
