"""The evaluation flow: prompts → generation actor pool → judges → per-language safety metrics (+ utility) → MLflow.

``run_evaluate(cfg, parent_run_id=None)`` is what ``raysafe evaluate``, ``jobs/evaluate.py``, ``raysafe study`` and the
tests call. It is resumable: generation, utility and judgement shards already marked done are skipped, so a re-run
after a kill (or with another judge) only does what is missing; the metrics are recomputed from the stored
judgements every time (cheap). Passing ``parent_run_id`` makes the MLflow run a child of that run.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_bytes, input_shard_path, read_inputs_marker, write_inputs
from raysafe.config import (
    ModelSpec,
    RaySpec,
    dump_config,
)
from raysafe.errors import DataError, ModelError, OutputError, remote_errors
from raysafe.evaluate.config import (
    EvaluateConfig,
    GenerationSpec,
    JudgeSpec,
    model_label,
)
from raysafe.evaluate.data import load_mc, load_prompts
from raysafe.evaluate.generate import Generator  # noqa: F401  (the generation backend `raysafe translate` uses)
from raysafe.evaluate.store import EvalStore, claim
from raysafe.identity import fingerprint
from raysafe.tables import write_table

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    output_dir: Path
    per_language: pl.DataFrame  # (model, judge, set, lang): counts, value, ci_low, ci_high, status, ...
    summary_table: pl.DataFrame  # (model, judge, set): mean, variance_pp2, agreement (+ intervals), counts, utility
    agreement_pairs: pl.DataFrame  # (model, judge, set, lang_a, lang_b)
    utility: pl.DataFrame  # (model, lang): accuracy and interval
    paths: dict[str, Path] = field(default_factory=dict)
    shards_generated: dict[str, int] = field(default_factory=dict)  # model -> generation shards produced by this call
    shards_judged: dict[str, int] = field(default_factory=dict)  # "model/judge" -> judgement shards produced now
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def summary(self) -> str:
        lines = [
            f"evaluation in {self.output_dir} ({self.seconds:.0f} s; generation shards made now: "
            f"{self.shards_generated}; judgement shards made now: {self.shards_judged})"
        ]
        for key, sub in self.per_language.group_by(["model", "judge", "set"], maintain_order=True):
            model, judge, set_name = key
            metric = sub["metric"][0]
            lines.append(f"\n{model} · judge {judge} · set {set_name} · {metric}")
            lines.append(
                f"  {'lang':<5}{'prompts':>8}{'safe':>6}{'unsafe':>7}{'unpars':>7}{'empty':>6}"
                f"{'value':>8}  {'95% CI':<15}status"
            )
            for r in sub.iter_rows(named=True):
                v = "   n/a" if r["value"] != r["value"] else f"{r['value']:6.3f}"
                ci = "" if r["ci_low"] != r["ci_low"] else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                lines.append(
                    f"  {r['lang']:<5}{r['n_prompts']:>8}{r['n_safe']:>6}{r['n_unsafe']:>7}"
                    f"{r['n_unparsed']:>7}{r['n_empty']:>6}  {v}  {ci:<15}{r['status']}"
                )
            s = self.summary_table.filter(
                (pl.col("model") == model) & (pl.col("judge") == judge) & (pl.col("set") == set_name)
            ).row(0, named=True)
            lines.append(
                f"  mean {s['mean']:.3f} [{s['mean_ci_low']:.3f}, {s['mean_ci_high']:.3f}]  variance "
                f"{s['variance_pp2']:.1f} pp² [{s['variance_ci_low']:.1f}, {s['variance_ci_high']:.1f}]  "
                f"agreement {s['agreement']:.3f} [{s['agreement_ci_low']:.3f}, {s['agreement_ci_high']:.3f}]"
                f"  unparsed {s['n_unparsed']}  empty {s['n_empty']}  languages without prompts: "
                f"{s['languages_without_prompts'] or 'none'}"
            )
        if self.utility.height:
            for (model,), sub in self.utility.group_by(["model"], maintain_order=True):
                acc = "  ".join(
                    f"{r['lang']} {r['accuracy']:.2f}" if r["status"] == "ok" else f"{r['lang']} n/a"
                    for r in sub.iter_rows(named=True)
                )
                s = self.summary_table.filter(pl.col("model") == model).row(0, named=True)
                lines.append(
                    f"\n{model} · multiple-choice accuracy (chance 0.25): mean {s['utility_accuracy']:.3f} "
                    f"[{s['utility_ci_low']:.3f}, {s['utility_ci_high']:.3f}] · {acc}"
                )
        lines.append(f"\ntables: {self.paths.get('per_language_csv')}, {self.paths.get('summary_csv')}")
        if self.mlflow_run_id:
            lines.append(f"MLflow run {self.mlflow_run_id}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- helpers
def _check_model(spec: ModelSpec, where: str) -> str:
    """Fail before any work when a model cannot be found; returns its weights fingerprint."""
    from raysafe.models.loading import load_hf_config, resolve

    try:
        resolved = resolve(spec)
    except ModelError as e:
        raise ModelError(e.what, where=f"{where} ({e.where})", fix=e.fix) from None
    try:
        load_hf_config(spec, resolved)
    except ModelError as e:
        raise ModelError(e.what, where=where, fix=e.fix) from None
    return resolved.fingerprint


def _threads(ray_spec: RaySpec) -> int:
    return ray_spec.torch_threads or max(1, int(ray_spec.num_cpus_per_actor))


def _run_pool(items: list[dict], stage, kwargs: dict, ray_spec: RaySpec, desc: str, progress: bool) -> list[dict]:
    import ray
    from tqdm.auto import tqdm

    from raysafe.runtime import actor_remote_args, ensure_ray, quiet_ray_data

    ensure_ray(ray_spec)
    quiet_ray_data()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        num_gpus=ray_spec.num_gpus_per_actor or None,
        num_cpus=ray_spec.num_cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ray_spec.num_actors),
        **actor_remote_args(ray_spec),
    )
    out = []
    with remote_errors(), tqdm(total=len(items), desc=desc, unit="shard", disable=not progress) as bar:
        for row in ds.iter_rows():
            out.append(row)
            bar.update(1)
    return out


def _languages(cfg: EvaluateConfig, present: list[str]) -> list[str]:
    return list(cfg.languages) if cfg.languages is not None else present


# -------------------------------------------------------------------------------------------------------- flow
def run_evaluate(
    cfg: EvaluateConfig,
    parent_run_id: str | None = None,
    progress: bool = True,
    restart: bool = False,
    lock: bool = True,
) -> EvaluateResult:
    """Evaluate every model of ``cfg`` on every set with every judge; see the module docstring. The output
    directory is locked while the evaluation runs (``lock``: a sweep's lock covers its trials' evaluations, which
    may restart on another node); ``restart`` moves an existing one aside (``<dir>.replaced-<UTC time>``) and
    starts afresh."""
    import contextlib

    from raysafe.atomic import remove_stale_temp_files
    from raysafe.locks import move_aside, output_lock

    check_generation_backend(cfg.generation)
    what = f"evaluation outputs {cfg.output_dir}"
    with output_lock(cfg.output_dir, what) if lock else contextlib.nullcontext():
        if restart:
            move_aside(cfg.output_dir)
        elif Path(cfg.output_dir).is_dir():
            remove_stale_temp_files(Path(cfg.output_dir))  # of a killed run: nobody else writes here now
        return _run_evaluate(cfg, parent_run_id, progress)


@dataclass
class _Inputs:
    """The prompts and multiple-choice questions of one evaluation, their languages, fingerprints and shards."""

    prompts: pl.DataFrame
    langs: list[str]
    prompts_fp: str
    mc: pl.DataFrame | None
    mc_langs: list[str]
    mc_fp: str | None
    n_prompt_shards: int = 0
    n_mc_shards: int = 0


def _restrict_languages(df: pl.DataFrame, languages: list[str] | None, what: str, where: str, fix: str):
    """Rows of ``df`` in ``languages`` (all when None), renumbered; refuses when none is left."""
    if languages is None:
        return df
    df = df.filter(pl.col("lang").is_in(languages))
    if df.height == 0:
        raise DataError(what, where=where, fix=fix)
    return df.drop("row_id").with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64))


def _log_inputs(cfg: EvaluateConfig, inputs: _Inputs) -> None:
    """The datasets the run reads (prompt sets, multiple-choice questions) and where each model came from (the
    training run and identity of a raysafe checkpoint) on the MLflow run."""
    sources = {f"{s.name}[{i}]": src for s in cfg.sets for i, src in enumerate(s.sources)}
    names = "+".join(s.name for s in cfg.sets)
    tracking.log_input(f"{names} (prompts)", sources, inputs.prompts_fp, inputs.prompts.height, context="evaluation")
    if inputs.mc is not None:
        mc_sources = {f"utility[{i}]": src for i, src in enumerate(cfg.utility.sources)}
        tracking.log_input("multiple-choice questions", mc_sources, inputs.mc_fp, inputs.mc.height, context="utility")
    for m in cfg.models:
        tracking.log_model_lineage(model_label(m), m.path)


def _load_inputs(cfg: EvaluateConfig) -> _Inputs:
    """Prompts and (when utility is on) multiple-choice questions, validated before any model is loaded."""
    prompts = _restrict_languages(
        load_prompts(cfg.sets),
        cfg.languages,
        f"no prompt of the sets is in languages {cfg.languages}",
        "languages",
        "list languages the sets have, or leave `languages` unset",
    )
    langs = _languages(cfg, list(dict.fromkeys(prompts["lang"].to_list())))
    prompts_fp = fingerprint(prompts)
    mc = None
    if cfg.utility.enabled:
        mc = _restrict_languages(
            load_mc(cfg.utility),
            cfg.languages,
            f"no multiple-choice question is in languages {cfg.languages}",
            "utility.sources",
            "add questions in those languages, or set utility.enabled=false",
        )
    mc_langs = _languages(cfg, list(dict.fromkeys(mc["lang"].to_list()))) if mc is not None else []
    mc_fp = fingerprint(mc) if mc is not None else None
    return _Inputs(prompts, langs, prompts_fp, mc, mc_langs, mc_fp)


def _check_models_and_judges(cfg: EvaluateConfig) -> dict[str, str]:
    """Models and judges exist (fail before any work); returns each model's weights fingerprint by label."""
    from raysafe.evaluate.judges import make_judge

    fps = {model_label(m): _check_model(m, f"models[{i}].path") for i, m in enumerate(cfg.models)}
    for i, j in enumerate(cfg.judges):
        if j.kind == "classifier":
            _check_model(j.model, f"judges[{i}].model.path")
        elif j.kind == "openai":
            make_judge(j)  # raises ConfigError when the endpoint's environment variable is unset
    return fps


def _claim_outputs(cfg: EvaluateConfig, store: EvalStore, fps: dict[str, str], inputs: _Inputs) -> None:
    """Each model's generations, utility scores and judgements belong to exactly these weights and inputs."""
    for spec in cfg.models:
        label = model_label(spec)
        gen_id = {
            "model_path": spec.path,
            "fingerprint": fps[label],
            "prompts": inputs.prompts_fp,
            "generation": cfg.generation.identity(),
        }
        claim(store.model_dir(label) / "model.json", gen_id, f"generations of model {label!r}")
        if inputs.mc is not None:
            claim(
                store.utility(label).root / "utility.json",
                {"fingerprint": fps[label], "questions": inputs.mc_fp, "utility": cfg.utility.model_dump(mode="json")},
                f"utility scores of model {label!r}",
            )
        for j in cfg.judges:
            claim(
                store.judgements(label, j.label).root / "judge.json",
                {"judge": j.model_dump(mode="json", exclude={"ray"}), "generations": gen_id},
                f"judgements by {j.label!r}",
            )


def _generate(cfg: EvaluateConfig, store: EvalStore, spec: ModelSpec, inputs: _Inputs, progress: bool) -> int:
    """Generation and multiple-choice shards of one model still missing, run on the actor pool; returns how many
    generation shards were missing."""
    from raysafe.evaluate.stages import ModelWorkerStage

    label = model_label(spec)
    gen_missing = store.generations(label).missing(inputs.n_prompt_shards)
    mc_missing = store.utility(label).missing(inputs.n_mc_shards) if inputs.mc is not None else []
    items = []
    if cfg.generation.backend == "vllm":
        from raysafe.evaluate.vllm_backend import generate_shards

        generate_shards(cfg.generation, spec, cfg.ray, store, label, gen_missing, progress)
    else:
        items += [{"task": "generate", "shard_id": k} for k in gen_missing]
    # multiple-choice scoring needs the model's log-likelihoods: always the hf model in the actor pool
    items += [{"task": "mc", "shard_id": k} for k in mc_missing]
    if items:
        _run_pool(
            items,
            ModelWorkerStage,
            {
                "model": spec.model_dump(),
                "generation": cfg.generation.model_dump(),
                "utility": cfg.utility.model_dump(),
                "store_root": str(store.root),
                "model_label": label,
                "torch_threads": _threads(cfg.ray),
            },
            cfg.ray,
            f"generate {label}",
            progress,
        )
    return len(gen_missing)


def _judge(cfg: EvaluateConfig, store: EvalStore, label: str, j: JudgeSpec, n: int, tokens: dict, progress) -> int:
    """Judgement shards of one model by one judge that are missing or stale (their generation changed), judged
    now; returns how many."""
    from raysafe.evaluate.judges import make_judge
    from raysafe.evaluate.stages import ClassifierJudgeStage, judge_shard

    missing = store.judgements(label, j.label).stale_or_missing(n, "generation_token", tokens)
    if missing and j.kind == "classifier":
        jray = j.ray or cfg.ray
        _run_pool(
            [{"shard_id": k} for k in missing],
            ClassifierJudgeStage,
            {
                "judge": j.model_dump(),
                "store_root": str(store.root),
                "model_label": label,
                "torch_threads": _threads(jray),
            },
            jray,
            f"judge {label} ({j.label})",
            progress,
        )
    elif missing:
        judge = make_judge(j)
        for k in missing:
            judge_shard(judge, store, label, k)
    return len(missing)


@dataclass
class _Tables:
    """Rows of the result tables, gathered model by model."""

    per_lang: list = field(default_factory=list)
    summary: list = field(default_factory=list)
    pairs: list = field(default_factory=list)
    util_rows: list = field(default_factory=list)
    util_summ: dict = field(default_factory=dict)


def _evaluate_model(cfg, store: EvalStore, spec: ModelSpec, inputs: _Inputs, result, tables: _Tables, progress):
    """Generates, judges and scores one model, adding its rows to ``tables``; writes its responses CSV."""
    from raysafe.evaluate.tables import safety_tables, utility_table

    label = model_label(spec)
    n = inputs.n_prompt_shards
    result.shards_generated[label] = _generate(cfg, store, spec, inputs, progress)
    gens = store.generations(label).read(n)
    tokens = {k: (store.generations(label).info(k) or {}).get("token") for k in range(n)}
    for j in cfg.judges:
        result.shards_judged[f"{label}/{j.label}"] = _judge(cfg, store, label, j, n, tokens, progress)
        judged = store.judgements(label, j.label).read(n)
        a, b, c = safety_tables(inputs.prompts, judged, label, j.label, inputs.langs, cfg.metrics)
        tables.per_lang += a
        tables.summary += b
        tables.pairs += c
    if inputs.mc is not None:
        scores = store.utility(label).read(inputs.n_mc_shards)
        rows, tables.util_summ[label] = utility_table(inputs.mc, scores, label, inputs.mc_langs, cfg.metrics)
        tables.util_rows += rows
    _write_responses(store, label, gens, cfg.judges, n)


def _fill_result(result: EvaluateResult, tables: _Tables) -> None:
    """The result's frames from the gathered rows (utility columns NaN when utility is off)."""
    from raysafe.evaluate.tables import PER_LANGUAGE_SCHEMA, frame

    result.per_language = frame(tables.per_lang, PER_LANGUAGE_SCHEMA)
    summ = frame(tables.summary)
    if tables.util_summ:
        summ = summ.join(pl.DataFrame(list(tables.util_summ.values())), on="model", how="left")
    else:
        summ = summ.with_columns(
            pl.lit(float("nan")).alias(c) for c in ("utility_accuracy", "utility_ci_low", "utility_ci_high")
        )
    result.summary_table = summ
    result.agreement_pairs = frame(tables.pairs)
    result.utility = frame(tables.util_rows)


def check_generation_backend(generation: GenerationSpec | dict, where: str = "generation.backend") -> None:
    """Refuse before any work when the generation backend asked for cannot run here (vllm not installed). The
    study and the sweep call it on their evaluation settings before they start."""
    spec = generation if isinstance(generation, GenerationSpec) else GenerationSpec.model_validate(generation)
    if spec.backend == "vllm":
        from raysafe.evaluate.vllm_backend import require_vllm

        require_vllm(where)


def _run_evaluate(cfg: EvaluateConfig, parent_run_id: str | None, progress: bool) -> EvaluateResult:
    t_start = time.perf_counter()
    store = EvalStore(cfg.output_dir)
    # ---- inputs (validated before any model is loaded)
    inputs = _load_inputs(cfg)
    # ---- models and judges exist (fail before any work)
    fps = _check_models_and_judges(cfg)
    inputs.n_prompt_shards = write_inputs(
        store.prompts.root, inputs.prompts, cfg.generation.shard_rows, inputs.prompts_fp, "prompts"
    )
    inputs.n_mc_shards = (
        write_inputs(store.mc.root, inputs.mc, cfg.utility.shard_rows, inputs.mc_fp, "questions")
        if inputs.mc is not None
        else 0
    )
    _claim_outputs(cfg, store, fps, inputs)

    result = EvaluateResult(Path(cfg.output_dir), pl.DataFrame(), pl.DataFrame(), pl.DataFrame(), pl.DataFrame())
    name = cfg.tracking.run_name or f"evaluate {'+'.join(model_label(m) for m in cfg.models)}"
    with tracking.run(cfg.tracking, name, parent_run_id=parent_run_id, tags={"raysafe.flow": "evaluate"}) as mlrun:
        tracking.log_params({"config": cfg.model_dump(mode="json"), "prompts_fingerprint": inputs.prompts_fp})
        _log_inputs(cfg, inputs)
        tables = _Tables()
        for spec in cfg.models:
            _evaluate_model(cfg, store, spec, inputs, result, tables, progress)
        _fill_result(result, tables)
        _write_outputs(cfg, store, result)
        result.seconds = time.perf_counter() - t_start
        if mlrun is not None:
            _log_mlflow(cfg, result)
            result.mlflow_run_id = mlrun.info.run_id
    return result


def _write_responses(store: EvalStore, label: str, gens: pl.DataFrame, judges: list[JudgeSpec], n: int) -> None:
    """One CSV per model with every response beside every judge's verdict, for reading by eye."""
    df = gens
    for j in judges:
        v = store.judgements(label, j.label).read(n).select("row_id", pl.col("verdict").alias(f"verdict_{j.label}"))
        df = df.join(v, on="row_id", how="left")
    buf = io.BytesIO()
    df.sort("row_id").write_csv(buf)
    atomic_write_bytes(store.model_dir(label) / "responses.csv", buf.getvalue())


def _write_outputs(cfg: EvaluateConfig, store: EvalStore, result: EvaluateResult) -> None:
    from raysafe.plots import per_language_bars

    out = store.metrics_dir
    for name, df in (
        ("per_language", result.per_language),
        ("summary", result.summary_table),
        ("agreement_pairs", result.agreement_pairs),
        ("utility", result.utility),
    ):
        if df.width:
            result.paths[f"{name}_parquet"], result.paths[f"{name}_csv"] = write_table(df, out, name)
    for (judge, set_name), sub in result.per_language.group_by(["judge", "set"], maintain_order=True):
        metric = sub["metric"][0]
        p = per_language_bars(
            sub,
            out / f"per_language_{set_name}_{judge}.png",
            title=f"{set_name}: {metric.replace('_', ' ')} per language (judge {judge}, "
            f"{int(cfg.metrics.confidence * 100)}% bootstrap CI)",
            ylabel=metric.replace("_", " "),
        )
        result.paths[f"figure_{set_name}_{judge}"] = p
    if result.utility.width:
        result.paths["figure_utility"] = per_language_bars(
            result.utility,
            out / "utility_per_language.png",
            value="accuracy",
            title="multiple-choice accuracy per language (dashed: chance 0.25)",
            ylabel="accuracy",
            hline=0.25,
        )
    cfg_path = store.root / "config.yaml"
    atomic_write_bytes(cfg_path, dump_config(cfg).encode())
    result.paths["config"] = cfg_path


def _log_mlflow(cfg: EvaluateConfig, result: EvaluateResult) -> None:
    multi = len(cfg.models) > 1
    metrics: dict[str, float] = {}

    def put(key: str, v) -> None:
        if v is not None and v == v:
            metrics[key] = float(v)

    for r in result.summary_table.iter_rows(named=True):
        p = f"{r['model']}." if multi else ""
        base = f"{p}{r['set']}.{r['judge']}"
        put(f"{base}.{r['metric']}_mean", r["mean"])
        put(f"{base}.variance_pp2", r["variance_pp2"])
        put(f"{base}.agreement", r["agreement"])
        put(f"{base}.n_unparsed", r["n_unparsed"])
        put(f"{base}.n_empty", r["n_empty"])
        put(f"{p}utility.accuracy_mean", r.get("utility_accuracy"))
    for r in result.per_language.iter_rows(named=True):
        p = f"{r['model']}." if multi else ""
        put(f"{p}{r['set']}.{r['judge']}.{r['metric']}.{r['lang']}", r["value"])
    for r in result.utility.iter_rows(named=True) if result.utility.width else []:
        p = f"{r['model']}." if multi else ""
        put(f"{p}utility.accuracy.{r['lang']}", r["accuracy"])
    put("seconds", result.seconds)
    tracking.log_metrics(metrics)
    tracking.log_params({"output_dir": str(result.output_dir.resolve())})
    tracking.log_artifact(result.output_dir / "metrics", "metrics")
    tracking.log_artifact(result.output_dir / "config.yaml")


def safety_outcomes(output_dir: str | Path, model: str, judge: str, set_name: str) -> pl.DataFrame:
    """The judged outcome of every harmful prompt of ``set_name`` for ``model`` in an evaluation's output directory:
    lang, group_id, safe (1.0 safe, 0.0 unsafe; unparsed verdicts left out). For paired comparisons of two models
    evaluated on the same prompts (the study's MLC − control difference)."""
    store = EvalStore(output_dir)
    marker = read_inputs_marker(store.prompts.root)
    if marker is None:
        raise OutputError(
            f"{store.root} holds no complete evaluation inputs",
            where=str(store.prompts.root),
            fix="run the evaluation (or the study's evaluate stage) to the end first",
        )
    n = int(marker["shards"])
    prompts = pl.concat([pl.read_parquet(input_shard_path(store.prompts.root, k)) for k in range(n)], how="diagonal")
    prompts = prompts.filter((pl.col("set") == set_name) & pl.col("harmful"))
    verdicts = store.judgements(model, judge).read(n).select("row_id", "verdict")
    return (
        prompts.join(verdicts, on="row_id", how="inner")
        .filter(pl.col("verdict").is_in(["safe", "unsafe"]))
        .select("lang", "group_id", (pl.col("verdict") == "safe").cast(pl.Float64).alias("safe"))
    )
