"""The value-concept flow (Xu et al., 2024): activations → concept vectors → recognition, consistency, language
distance, transfer → steering → tables, figures, report, MLflow.

``run_concepts(cfg)`` is what ``raysafe concepts``, ``jobs/concepts.py`` and the tests call. Stages:

1. plan: read and validate the concept pairs (and the neutral texts for steering), look up each model's depth and
   split the requested layers into valid ones and ones out of range (reported, not fatal);
2. activations through :func:`raysafe.extract.flow.ensure_activations`: reused only when the store's identity
   (weights and texts fingerprints, vector-shaping settings) is current and covers the layers, else extracted,
   resumed or redone; each model's identity goes to ``<output_dir>/<model>/activations.json``, the index's
   ``activations.json`` and the MLflow params;
3. per model, the streaming analysis (:func:`raysafe.concepts.tables.analyse_concepts`, one layer in memory
   at a time) with URIEL distances, written at once as tables (Parquet + CSV), figures and ``report.md``;
4. per model, steering with the source language's vectors (the model is loaded once, in this process), then the
   report is rewritten with the steering tables and figures;
5. an index ``report.md`` and ``summary.parquet`` over models; everything logged to one MLflow run.

Problems that concern one concept, language or layer are rows of each model's ``status`` table and the rest
completes; a model whose analysis fails does not stop the others (the error is raised at the end, after every other
output is written).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_json
from raysafe.concepts.config import ConceptsConfig
from raysafe.concepts.steering import (
    SteeringOutput,
    run_concept_steering,
)
from raysafe.concepts.tables import (
    analyse_concepts,
)
from raysafe.config import (
    ModelSpec,
    SourceSpec,
    dump_config,
)
from raysafe.errors import ConfigError, RaysafeError
from raysafe.extract.config import ExtractConfig, ExtractSpec
from raysafe.extract.flow import Activations
from raysafe.identity import analysis_identity, fingerprint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ModelConcepts:
    """What the flow produced for one model."""

    label: str
    output_dir: Path
    report: Path | None = None
    num_layers: int = 0
    layers: list[int] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)
    recognition_by_lang: dict[str, float] = field(default_factory=dict)
    steering_rows: int = 0
    n_problems: int = 0
    error: str | None = None


@dataclass
class ConceptsResult:
    output_dir: Path
    report: Path | None = None
    models: dict[str, ModelConcepts] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    extracted: dict[str, bool] = field(default_factory=dict)
    activations: dict[str, dict] = field(default_factory=dict)  # model → identity of the activations analysed
    identity: str | None = None  # digest of the config and the activations' identities
    mlflow_run_id: str | None = None

    def summary(self) -> str:
        lines = [f"value concepts in {self.output_dir}  (report: {self.report})"]
        for m in self.models.values():
            if m.error:
                lines.append(f"  {m.label}: FAILED — {m.error}")
                continue
            h = m.headline
            rec = " ".join(f"{lang} {acc:.2f}" for lang, acc in sorted(m.recognition_by_lang.items()))
            lines.append(
                f"  {m.label}: layers analysed {_span(m.layers)}; {m.n_problems} status row(s) (see its report)"
            )
            lines.append(f"    recognition, test acc. at the train-selected layer (mean over concepts): {rec}")
            lines.append(
                f"    mean cross-lingual cosine (max over layers / at selected layer): "
                f"{_fmt(h.get('consistency.mean_max_cosine'))} / {_fmt(h.get('consistency.mean_cosine_at_layer'))}"
            )
            corr = ", ".join(
                f"{k.split('.')[1]} {_fmt(v)}"
                for k, v in h.items()
                if k.startswith("distance_corr.") and k.endswith(".all.pearson_r")
            )
            if corr:
                lines.append(f"    Pearson r of similarity vs 1 - URIEL distance (all pairs): {corr}")
            lines.append(
                f"    transfer delta high→low {_fmt(h.get('transfer.mean_high_to_low'))}, low→high "
                f"{_fmt(h.get('transfer.mean_low_to_high'))}"
            )
            steered = sorted({k.split(".")[1] for k in h if k.startswith("steering.")})
            for c in steered:
                lines.append(
                    f"    steering {c}, mean over targets at the largest α: projection shift "
                    f"{_fmt(h.get(f'steering.{c}.projection_shift_in_gaps'))} pair gaps, behaviour shift "
                    f"{_fmt(h.get(f'steering.{c}.behaviour_shift'))} nats/token, perplexity × "
                    f"{_fmt(h.get(f'steering.{c}.perplexity_ratio'))}"
                )
            lines.append(f"    report: {m.report}")
        lines.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        if self.mlflow_run_id:
            lines.append(f"MLflow run {self.mlflow_run_id}")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


# ------------------------------------------------------------------------------------------------------ stages


def concept_source(cfg: ConceptsConfig) -> SourceSpec:
    return cfg.data.model_copy(update={"contract": "concept_pairs"})


def load_pairs(cfg: ConceptsConfig) -> pl.DataFrame:
    from raysafe.data.schemas import CONCEPT_PAIRS
    from raysafe.data.sources import load_table

    return load_table(concept_source(cfg), CONCEPT_PAIRS)


def load_neutral(cfg: ConceptsConfig) -> pl.DataFrame | None:
    if not cfg.steering.enabled:
        return None
    from raysafe.data.schemas import PROMPT_VARIANTS
    from raysafe.data.sources import load_table

    return load_table(cfg.steering.neutral, PROMPT_VARIANTS)


def plan_layers(requested: list[int] | str, n_layers: int) -> tuple[list[int], list[int]]:
    """(requested layers in order, the valid ones 0..n_layers)."""
    wanted = list(range(n_layers + 1)) if requested == "all" else list(dict.fromkeys(requested))
    return wanted, [x for x in wanted if 0 <= x <= n_layers]


def extract_config(
    cfg: ConceptsConfig, spec: ModelSpec, layers: list[int] | str, positions: list[str]
) -> ExtractConfig:
    templates = {k: v for k, v in cfg.extract.templates.items() if k == spec.label}
    ex = cfg.extract.model_copy(update={"layers": layers, "positions": positions, "templates": templates})
    return ExtractConfig(
        models=[spec],
        data=concept_source(cfg),
        output_dir=cfg.activations_dir,
        extract=ExtractSpec.model_validate(ex.model_dump()),
        ray=cfg.ray,
        tracking=cfg.tracking,
    )


def ensure_activations(
    cfg: ConceptsConfig, plans: list[tuple[ModelSpec, int, list[int], list[int]]], progress: bool
) -> dict[str, Activations]:
    """Each model's activations through the extraction flow's one door: reused when current and covering the
    valid layers, else extracted, resumed, extended or redone (the local Ray instance, if this call started it, is
    shut down afterwards to free memory and cores for the analysis and steering)."""
    from raysafe.extract.flow import ensure_activations as ensure

    out: dict[str, Activations] = {}
    for spec, n_layers, _, valid in plans:
        layers: list[int] | str = "all" if valid == list(range(n_layers + 1)) else valid
        out[spec.label] = ensure(
            extract_config(cfg, spec, layers, [cfg.position]),
            progress=progress,
            shutdown_ray=True,
            what=f"activations of {spec.label}",
        )
    return out


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 3:
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def headline(
    tables: dict[str, pl.DataFrame], steering: pl.DataFrame | None
) -> tuple[dict[str, float], dict[str, float]]:
    """(scalar findings for MLflow and the summary, recognition accuracy per language at the train-selected layer
    averaged over concepts)."""
    h: dict[str, float] = {}
    rb = tables["recognition_best"]
    by_lang: dict[str, float] = {}
    if rb.height:
        per = (
            rb.group_by("lang")
            .agg(
                pl.col("test_acc_at_train_selected_layer").mean().alias("a"),
                pl.col("test_acc_at_test_selected_layer").mean().alias("b"),
            )
            .sort("lang")
        )
        for lang, a, b in per.iter_rows():
            by_lang[lang] = float(a)
            h[f"recognition.test_acc.{lang}"] = float(a)
            h[f"recognition.test_acc_test_selected.{lang}"] = float(b)
        h["recognition.test_acc_mean"] = float(rb["test_acc_at_train_selected_layer"].mean())
    cs = tables["consistency_summary"].filter(pl.col("concept") == "mean")
    if cs.height:
        h["consistency.mean_max_cosine"] = float(cs["max_cosine"].mean())
        h["consistency.mean_cosine_at_layer"] = float(cs["cosine_at_concept_layer"].mean())
    for dt, subset, r, rho, n in (
        tables["distance_correlation"]
        .filter(pl.col("concept") == "mean")
        .select("distance_type", "subset", "pearson_r", "spearman_rho", "n")
        .iter_rows()
    ):
        h[f"distance_corr.{dt}.{subset}.pearson_r"] = float(r)
        h[f"distance_corr.{dt}.{subset}.spearman_rho"] = float(rho)
        h[f"distance_corr.{dt}.{subset}.n"] = float(n)
    ta = tables["transfer_asymmetry"].filter(pl.col("concept") == "mean")
    if ta.height:
        for k in ("mean_high_to_low", "mean_low_to_high", "high_minus_low"):
            h[f"transfer.{k}"] = float(ta[k][0])
    if steering is not None and steering.height:
        top = steering.filter(pl.col("alpha") == steering["alpha"].max())
        for (concept,), part in top.group_by(["concept"], maintain_order=True):
            for k in ("projection_shift", "projection_shift_in_gaps", "behaviour_shift", "perplexity_ratio"):
                h[f"steering.{concept}.{k}"] = float(part[k].mean())
    return h, by_lang


def steering_metrics(steering: pl.DataFrame) -> dict[str, float]:
    """Per (concept, layers, lang) the measurements at the smallest and the largest alpha."""
    out: dict[str, float] = {}
    if steering.height == 0:
        return out
    extremes = {steering["alpha"].min(), steering["alpha"].max()}
    for row in steering.filter(pl.col("alpha").is_in(list(extremes))).iter_rows(named=True):
        key = f"steering.{row['concept']}.L{row['layers'].replace(',', '_')}.{row['lang']}.alpha{row['alpha']:g}"
        for k in ("projection_shift", "projection_shift_in_gaps", "behaviour_shift", "perplexity_ratio"):
            v = row[k]
            if v is not None and math.isfinite(v):
                out[f"{key}.{k}"] = float(v)
    return out


def steer_model(
    cfg: ConceptsConfig,
    spec: ModelSpec,
    tables: dict[str, pl.DataFrame],
    pairs: pl.DataFrame,
    neutral: pl.DataFrame | None,
) -> SteeringOutput:
    """Load the model once in this process and run the steering measurements."""
    import torch

    from raysafe.models.loading import load_model

    threads = torch.get_num_threads()
    if cfg.steering.torch_threads:
        torch.set_num_threads(cfg.steering.torch_threads)
    try:
        t0 = time.perf_counter()
        model, tok = load_model(spec, device=cfg.steering.device)
        log.info("loaded %s for steering in %.1fs", spec.label, time.perf_counter() - t0)
        analysed = {c: sorted(g["lang"].unique().to_list()) for (c,), g in tables["recognition"].group_by(["concept"])}
        out = run_concept_steering(
            model,
            tok,
            cfg.steering,
            model_label=spec.label,
            vectors=tables["vectors"],
            concept_layers=tables["concept_layers"],
            pairs=pairs,
            neutral=neutral,
            analysed_langs=analysed,
        )
        del model
        return out
    finally:
        torch.set_num_threads(threads)


def _with_status(tables: dict[str, pl.DataFrame], rows: list[dict], model: str) -> dict[str, pl.DataFrame]:
    if not rows:
        return tables
    extra = pl.DataFrame(rows, schema={k: tables["status"].schema[k] for k in rows[0]}, orient="row")
    extra = extra.select(pl.lit(model).alias("model"), pl.all())
    return {**tables, "status": pl.concat([tables["status"], extra.select(tables["status"].columns)])}


def analyse_model(
    cfg: ConceptsConfig,
    spec: ModelSpec,
    n_layers: int,
    wanted: list[int],
    pairs: pl.DataFrame,
    neutral: pl.DataFrame | None,
    out: ModelConcepts,
    seconds: dict[str, float],
) -> None:
    """Analysis, outputs, steering and logging of one model (fills ``out``)."""
    from raysafe.concepts.report import write_concept_report
    from raysafe.extract.flow import ActivationStore
    from raysafe.tables import write_table

    label = spec.label
    t0 = time.perf_counter()
    log.info("[3/5] analysing %s: %d layer(s), position %s", label, len(wanted), cfg.position)
    reader = ActivationStore(cfg.activations_dir).reader(cfg.position)
    tables = analyse_concepts(reader, label, wanted, cfg.analysis.options(n_layers))
    seconds[f"analysis {label}"] = time.perf_counter() - t0
    out.layers = sorted(set(tables["recognition"]["layer"].to_list()))
    notes = [
        f"Model `{label}` ({spec.path}); activations `{cfg.activations_dir}`, position `{cfg.position}`; "
        f"method `{cfg.analysis.method}`; layers analysed: {_span(out.layers)}. Identity of the activations "
        "(weights and texts fingerprints): `activations.json`."
    ]
    for name, df in tables.items():  # the analysis is on disk before steering starts
        write_table(df, out.output_dir / "tables", name)
    steering = judged = gens = None
    try:
        if cfg.steering.enabled:
            t0 = time.perf_counter()
            log.info(
                "[4/5] steering %s with %s vectors, alphas %s", label, cfg.steering.source_lang, cfg.steering.alphas
            )
            tables, steering, judged, gens = _steer_outputs(cfg, spec, tables, pairs, neutral)
            seconds[f"steering {label}"] = time.perf_counter() - t0
            out.steering_rows = steering.height if steering is not None else 0
    finally:  # tables, figures and report, with whatever steering produced
        t0 = time.perf_counter()
        out.report = write_concept_report(
            tables, out.output_dir, steering=steering, notes=notes, judged=judged, generations=gens
        )
        seconds[f"report {label}"] = time.perf_counter() - t0
        log.info("wrote %s", out.report)
    out.headline, out.recognition_by_lang = headline(tables, steering)
    out.n_problems = tables["status"].height
    _log_outcome(label, tables, steering, out)
    tracking.log_artifact(out.output_dir, f"concepts/{label}")


def _steer_outputs(
    cfg: ConceptsConfig,
    spec: ModelSpec,
    tables: dict[str, pl.DataFrame],
    pairs: pl.DataFrame,
    neutral: pl.DataFrame | None,
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame | None, pl.DataFrame | None, pl.DataFrame | None]:
    """Steer one model: ``tables`` with the steering status rows added (a failure becomes one skipped row) and
    the steering measurements, judged rates and generations (None where empty or failed)."""
    label = spec.label
    steering = judged = gens = None
    try:
        res = steer_model(cfg, spec, tables, pairs, neutral)
        steering = res.measurements if res.measurements.height else None
        judged = res.judged if res.judged.height else None
        gens = res.generations if res.generations.height else None
        tables = _with_status(tables, res.status, label)
    except RaysafeError as err:
        tables = _with_status(
            tables,
            [
                {
                    "scope": "steering",
                    "concept": None,
                    "lang": None,
                    "layer": None,
                    "status": "skipped",
                    "message": f"steering failed: {' '.join(str(err).split())}",
                }
            ],
            label,
        )
    return tables, steering, judged, gens


def _log_outcome(
    label: str, tables: dict[str, pl.DataFrame], steering: pl.DataFrame | None, out: ModelConcepts
) -> None:
    """Log one model's skipped rows and warnings, and track its headline, steering and status-row metrics."""
    skipped = tables["status"].filter(pl.col("status") == "skipped")
    for message in skipped["message"]:
        log.warning("%s: %s", label, message)
    if tables["status"].height > skipped.height:
        log.info(
            "%s: %d warning(s) in the status table (e.g. correlations over fewer than 3 language pairs)",
            label,
            tables["status"].height - skipped.height,
        )
    tracking.log_metrics({f"{label}.{k}": v for k, v in out.headline.items() if math.isfinite(v)})
    if steering is not None:
        tracking.log_metrics({f"{label}.{k}": v for k, v in steering_metrics(steering).items()})
    tracking.log_metrics({f"{label}.n_status_rows": out.n_problems})


def write_index(result: ConceptsResult, cfg: ConceptsConfig) -> Path:
    """``summary.parquet`` / ``.csv`` (model, metric, value) and an index ``report.md`` linking each model's."""
    from raysafe.concepts.report import markdown_table
    from raysafe.tables import write_table

    rows = [{"model": m.label, "metric": k, "value": v} for m in result.models.values() for k, v in m.headline.items()]
    summary = pl.DataFrame(rows, schema={"model": pl.String, "metric": pl.String, "value": pl.Float64})
    write_table(summary, result.output_dir, "summary")
    parts = [
        "# Multilingual value concepts\n",
        f"Concept pairs: `{cfg.data.name or cfg.data.path}`; position `{cfg.position}`; method "
        f"`{cfg.analysis.method}`; steering {'from ' + cfg.steering.source_lang if cfg.steering.enabled else 'off'}.\n",
    ]
    for m in result.models.values():
        parts.append(f"## {m.label}\n")
        if m.error:
            parts.append(f"Failed: {m.error}\n")
            continue
        parts.append(
            f"[full report]({m.output_dir.relative_to(result.output_dir).as_posix()}/report.md) — "
            f"{m.n_problems} status row(s).\n"
        )
        rec = pl.DataFrame(
            {
                "lang": list(m.recognition_by_lang),
                "test_acc_at_train_selected_layer": list(m.recognition_by_lang.values()),
            },
            schema={"lang": pl.String, "test_acc_at_train_selected_layer": pl.Float64},
        )
        parts.append("Recognition (mean over concepts):\n\n" + markdown_table(rec))
        keys = [k for k in m.headline if not k.startswith("recognition.")]
        parts.append(
            "\n"
            + markdown_table(
                pl.DataFrame(
                    {"metric": keys, "value": [m.headline[k] for k in keys]},
                    schema={"metric": pl.String, "value": pl.Float64},
                )
            )
        )
    path = result.output_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _log_inputs(cfg: ConceptsConfig, pairs: pl.DataFrame, neutral: pl.DataFrame | None, acts: dict) -> None:
    """The datasets the run reads (concept pairs, steering's neutral prompts, each model's activations) and where each
    model came from (a raysafe checkpoint's training run) on the MLflow run."""
    tracking.log_input("concept pairs", {"data": concept_source(cfg)}, fingerprint(pairs), pairs.height, "concepts")
    if neutral is not None:
        src = {"neutral": cfg.steering.neutral}
        tracking.log_input("neutral prompts (steering)", src, fingerprint(neutral), neutral.height, "steering")
    for a in acts.values():
        a.log_inputs("concept pairs")
    tracking.log_models_lineage(cfg.models)


def run_concepts(cfg: ConceptsConfig, progress: bool = True) -> ConceptsResult:
    """Run the value-concept study for every model of ``cfg`` (see the module docstring)."""
    t_all = time.perf_counter()
    out_root = Path(cfg.output_dir)
    result = ConceptsResult(out_root)
    t0 = time.perf_counter()
    log.info("[1/5] reading concept pairs and checking models")
    pairs = load_pairs(cfg)
    neutral = load_neutral(cfg)
    plans = _plan_models(cfg)
    log.info(
        "%d concept pairs, concepts %s, languages %s",
        pairs.height,
        sorted(pairs["concept"].unique()),
        sorted(pairs["lang"].unique()),
    )
    result.seconds["plan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    log.info("[2/5] activations")
    acts = ensure_activations(cfg, plans, progress)
    result.extracted = {label: bool(a.extracted) for label, a in acts.items()}
    result.activations = {label: a.identities[label] for label, a in acts.items()}
    result.seconds["extraction"] = time.perf_counter() - t0
    _write_run_identity(cfg, result, out_root)
    failures: list[tuple[str, RaysafeError]] = []
    with tracking.run(cfg.tracking, "concepts", tags={"raysafe.flow": "concepts"}) as mlrun:
        tracking.log_params(
            {"config": cfg.model_dump(mode="json"), "analysis_identity": result.identity}
            | {k: v for a in acts.values() for k, v in a.params("acts").items()}
        )
        _log_inputs(cfg, pairs, neutral, acts)
        for spec, n, wanted, _ in plans:
            m = ModelConcepts(spec.label, out_root / spec.label, num_layers=n)
            result.models[spec.label] = m
            atomic_write_json(m.output_dir / "activations.json", acts[spec.label].record())
            try:
                analyse_model(cfg, spec, n, wanted, pairs, neutral, m, result.seconds)
            except RaysafeError as err:
                m.error = " ".join(err.what.split())
                failures.append((spec.label, err))
                log.error("%s: %s", spec.label, err)
        log.info("[5/5] index report")
        result.report = write_index(result, cfg)
        result.seconds["total"] = time.perf_counter() - t_all
        tracking.log_metrics({f"seconds.{k.replace(' ', '.')}": v for k, v in result.seconds.items()})
        if mlrun is not None:
            tracking.log_artifact(result.report, "concepts")
            tracking.log_artifact(out_root / "summary.parquet", "concepts")
            tracking.log_artifact(out_root / "config.yaml", "concepts")
            tracking.log_artifact(out_root / "activations.json", "concepts")
            result.mlflow_run_id = mlrun.info.run_id
    if failures:
        label, err = failures[0]
        others = [m for m in result.models if m != label]
        raise type(err)(
            f"the analysis of model {label!r} failed: {err.what}",
            where=err.where,
            fix=f"{err.fix or 'see the message above'}; the other models ({others or 'none'}) completed and "
            f"their outputs are in {out_root}",
        )
    return result


def _plan_models(cfg: ConceptsConfig) -> list[tuple[ModelSpec, int, list[int], list[int]]]:
    """(spec, depth, wanted layers, valid layers) of each model; a model with no valid layer is a config error,
    out-of-range layers are warned about (and reported and skipped later)."""
    from raysafe.models.loading import model_depth

    plans = []
    for spec in cfg.models:
        n = model_depth(spec)
        wanted, valid = plan_layers(cfg.layers, n)
        bad = [x for x in wanted if x not in valid]
        if not valid:
            raise ConfigError(
                f"none of the layers {wanted} exists in model {spec.label!r}, which has {n} decoder layers",
                where="layers",
                fix=f"use indices 0..{n} (0 = embeddings, {n} = last layer) or 'all'",
            )
        if bad:
            log.warning("%s: layer(s) %s out of range 0..%d; they are reported and skipped", spec.label, bad, n)
        plans.append((spec, n, wanted, valid))
    return plans


def _write_run_identity(cfg: ConceptsConfig, result: ConceptsResult, out_root: Path) -> None:
    """Write ``config.yaml`` and ``activations.json`` (the analysis identity and the activations' identities) and
    set ``result.identity``."""
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    result.identity = analysis_identity(cfg.model_dump(mode="json"), result.activations)
    atomic_write_json(
        out_root / "activations.json",
        {"identity": result.identity, "store": cfg.activations_dir, "models": result.activations},
    )
