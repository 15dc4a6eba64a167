"""The sweep flow: Ray Tune over the align + evaluate config (λ, β, τ, MLC layer, lr, language mixture, m).

``run_sweep(cfg)`` is what ``raysafe sweep``, ``jobs/sweep.py`` and the tests call:

1. validate everything before any trial starts: the search space against the model's depth and the known
   languages, every (mixture, m) combination against the data (the train flow's own checks), the evaluation and
   objective settings, and the trial resources against the cluster;
2. open one MLflow parent run (continued when the sweep resumes) and evaluate the base model once (for
   ``utility_drop`` / ``safety_gain``);
3. run the trials with Ray Tune (``raysafe.sweep.trial``: train → evaluate → held-out consistency), grid or random
   search (``BasicVariantGenerator``), optionally ASHA on an intermediate training metric, which Train reports to
   Tune at every optimiser step (its state kept across a resume, ``raysafe.sweep.scheduler``), at most
   ``max_concurrent_trials`` at once (default: as many as the full cluster's CPUs/GPUs fit — what its autoscaler can
   grow it to, or ``ray.capacity``);
4. write the results table, the Pareto plot and ``best_train_config.yaml`` and log them to the parent run.

Re-running the same config resumes the sweep (``Tuner.restore``): finished trials are kept, unfinished ones run
again (their training resumes from its own last checkpoint). Layout under ``output_dir/name``::

    sweep_config.yaml  sweep_state.json   the config and the MLflow parent run id
    asha_state.pkl                         ASHA's state (Tune's scheduler save format; restored on resume)
    tune/                                  the Tune experiment (what Tuner.restore reads)
    train/trial_<id>/                      each trial's Ray Train run (checkpoints, model/)
    trials/<id>/                           train_config.yaml, attempts.jsonl, evaluate/, result.json
    baseline/evaluate/                     the base model's evaluation
    results.parquet results.csv pareto.png best_train_config.yaml summary.txt
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_bytes, atomic_write_json
from raysafe.config import TrackingSpec, dump_config, load_config
from raysafe.errors import ConfigError, OutputError, RaysafeError, remote_errors, unwrap_remote_error
from raysafe.identity import differences, digest, flatten
from raysafe.sweep import metrics as M
from raysafe.sweep.config import (
    SweepConfig,
)
from raysafe.sweep.objective import ObjectiveSpec
from raysafe.sweep.space import (
    grid_size,
    param_space,
    trial_train_config,
    validate_space,
)
from raysafe.tables import write_table
from raysafe.train.config import TrainConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- result
@dataclass
class SweepResult:
    sweep_dir: Path
    table: pl.DataFrame
    best: dict | None
    paths: dict[str, Path] = field(default_factory=dict)
    planned_trials: int = 0
    resumed: bool = False
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    objective: ObjectiveSpec | None = None
    param_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        from raysafe.sweep.report import fmt

        n = self.table.height
        counts = dict(self.table.group_by("status").len().iter_rows()) if n else {}
        lines = [
            f"sweep {self.sweep_dir} ({'resumed, ' if self.resumed else ''}{self.seconds:.0f} s): "
            f"{n}/{self.planned_trials} trials — " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        ]
        obj = self.objective
        shown = ["trial_id", "status", *self.param_keys, "objective"]
        if obj is not None:
            shown += [t.metric for t in (obj.primary, *obj.terms, *obj.pareto)] + [c.metric for c in obj.constraints]
        shown += ["feasible", "pareto", "best"]
        shown = [c for c in dict.fromkeys(shown) if c in self.table.columns]
        if n:
            widths = {c: max(len(c), *(len(fmt(v)) for v in self.table[c].to_list())) for c in shown}
            lines.append("  " + "  ".join(c.rjust(widths[c]) for c in shown))
            for r in self.table.select(shown).iter_rows(named=True):
                lines.append("  " + "  ".join(fmt(r[c]).rjust(widths[c]) for c in shown))
        if self.best is not None:
            params = ", ".join(f"{k}={fmt(self.best.get(k))}" for k in self.param_keys)
            lines.append(f"best: trial {self.best['trial_id']} ({params}), objective {fmt(self.best['objective'])}")
            lines.append(f"  ready-to-run config: raysafe train {self.paths.get('best_config')}")
        else:
            lines.append("best: none — no evaluated trial met the constraints (see the table's violations column)")
        for key in ("results_csv", "results_parquet", "pareto_plot"):
            if key in self.paths:
                lines.append(f"{key.replace('_', ' ')}: {self.paths[key]}")
        if self.mlflow_run_id:
            lines.append(f"MLflow parent run {self.mlflow_run_id}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- helpers
def _absolute(tree: Any) -> Any:
    """A copy of a config tree with every relative ``path`` that exists locally made absolute (trials and their
    Train workers may run with another working directory)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if k == "path" and isinstance(v, str) and not Path(v).is_absolute() and Path(v).exists():
                out[k] = str(Path(v).resolve())
            else:
                out[k] = _absolute(v)
        return out
    if isinstance(tree, list):
        return [_absolute(x) for x in tree]
    return tree


def _tracking_spec(spec: TrackingSpec) -> dict:
    """The sweep's tracking settings with the store URI pinned (a relative SQLite path made absolute)."""
    uri = tracking.absolute_uri(tracking.resolve_uri(spec))
    return {**spec.model_dump(mode="json"), "tracking_uri": uri, "run_name": None}


def _wrap(e: RaysafeError, key: str) -> RaysafeError:
    return type(e)(e.what, where=f"{key} → {e.where}" if e.where else key, fix=e.fix)


def _identity(cfg: SweepConfig) -> dict[str, Any]:
    """What defines the trials (base config, space, search, scheduler, objective, evaluation), as named fields: a
    sweep directory holding another identity belongs to another sweep. Resources, tracking and retries may change
    on resume. (The trials' training runs check their own identity, data and weights included.)"""
    tree = cfg.model_dump(mode="json", include={"space", "scheduler", "objective", "evaluation"})
    tree["evaluation"]["evaluate"].pop("ray", None)  # resources, not results
    for key in ("cpus", "gpus", "torch_threads"):
        tree["evaluation"]["consistency"].pop(key, None)
    tree["train"] = cfg.base.model_dump(mode="json")
    tree["train"].pop("ray", None)  # the trials' train resources come from `resources`
    tree["search"] = {"algorithm": cfg.search.algorithm, "num_samples": cfg.search.num_samples, "seed": cfg.search.seed}
    tree["train"].pop("tracking", None)
    return flatten(tree)


def _check_resources(cfg: SweepConfig, evaluate_cfg) -> int:
    """Refuse trials that even the full cluster can never run — what its autoscaler can grow it to, else
    ``ray.capacity`` (:func:`raysafe.runtime.cluster_capacity`); returns the number of trials to run at once. Nodes
    that are not up yet are left to Ray's autoscaler (each trial's Train workers ask for them)."""
    from raysafe.runtime import cluster_capacity

    cap = cluster_capacity(cfg.ray.capacity)
    if cap.most is None:
        log.warning("cannot tell what the cluster can grow to (%s): trials are not sized against it", cap.describe())
    most = cap.most if cap.most is not None else {"CPU": math.inf, "GPU": math.inf}
    cpus, gpus = most.get("CPU", 0.0), most.get("GPU", 0.0)
    r = cfg.resources
    need_cpu = r.num_workers * r.cpus_per_worker
    grow = "run on a bigger cluster (RAY_ADDRESS) or, where it scales up and reports no limits, set ray.capacity"
    if need_cpu > cpus + 1e-9:
        raise ConfigError(
            f"a trial needs {need_cpu:g} CPUs for its {r.num_workers} train worker(s); the cluster: {cap.describe()}",
            where="resources.num_workers / resources.cpus_per_worker",
            fix=f"lower resources.num_workers or resources.cpus_per_worker, or {grow}",
        )
    if r.use_gpu and r.num_workers > gpus:
        raise ConfigError(
            f"a trial needs {r.num_workers} GPUs (one per train worker); the cluster: {cap.describe()}",
            where="resources.num_workers / resources.use_gpu",
            fix=f"lower resources.num_workers, or {grow}",
        )
    if evaluate_cfg is not None and evaluate_cfg.ray.num_cpus_per_actor > cpus:
        raise ConfigError(
            f"evaluation actors need {evaluate_cfg.ray.num_cpus_per_actor:g} CPUs; the cluster: {cap.describe()}",
            where="evaluation.evaluate.ray.num_cpus_per_actor",
            fix=f"lower evaluation.evaluate.ray.num_cpus_per_actor, or {grow}",
        )
    c = cfg.evaluation.consistency
    if cfg.evaluation.consistency.enabled and (c.cpus > cpus or c.gpus > gpus):
        raise ConfigError(
            f"the consistency task needs {c.cpus:g} CPUs / {c.gpus:g} GPUs; the cluster: {cap.describe()}",
            where="evaluation.consistency.cpus / gpus",
            fix=f"lower evaluation.consistency.cpus / evaluation.consistency.gpus, or {grow}",
        )
    if cap.most is None:  # as many as fit on the nodes that are up (at least one)
        cpus, gpus = cap.now.get("CPU", 0.0), cap.now.get("GPU", 0.0)
    fits = math.floor((cpus + 1e-9) / need_cpu)
    if r.use_gpu:
        fits = min(fits, math.floor(gpus / r.num_workers))
    log.info("cluster for the sweep: %s; %d trial(s) fit at once", cap.describe(), fits)
    if cfg.search.max_concurrent_trials is not None:
        if cfg.search.max_concurrent_trials > fits:
            log.warning(
                "max_concurrent_trials=%d but the cluster fits %d trial(s) at once: the others wait for resources",
                cfg.search.max_concurrent_trials,
                fits,
            )
        return cfg.search.max_concurrent_trials
    return max(1, fits)


def _status(metrics: dict, error: Any) -> str:
    if error is not None:
        return "error"
    if metrics.get("final") == 1.0:
        return "finished"
    if "train_step" in metrics:
        return "stopped"
    return "not run"


_METRIC_PREFIXES = ("train_", "safety_", "utility_", "consistency_")


def _error_text(error: BaseException) -> str:
    """A failed trial's error for the table: the raysafe error inside Ray's wrapping on one line (what, where, fix),
    else the last line of Ray's text."""
    err = unwrap_remote_error(error)
    text = " | ".join(" ".join(x.split()) for x in str(err).splitlines()) if err is not None else str(error).strip()
    return (text.splitlines()[-1] if text else repr(error))[:500]


def _rows(results, sweep_dir: Path, param_keys: list[str]) -> list[dict]:
    from raysafe.sweep.trial import RESULT_FILE, RUN_FILE, trial_dir

    rows = []
    for res in results:
        trial_id = Path(res.path).name.removeprefix("trial_")
        m = dict(res.metrics or {})
        row: dict[str, Any] = {"trial_id": trial_id, "status": _status(m, res.error)}
        for k in param_keys:
            row[k] = (res.config or {}).get(k)
        for k, v in m.items():
            if (k.startswith(_METRIC_PREFIXES) or k in ("objective", "feasible")) and isinstance(v, (int, float)):
                row[k] = float(v)
        tdir = trial_dir(sweep_dir, trial_id)
        if (tdir / RUN_FILE).exists():
            row["mlflow_run_id"] = json.loads((tdir / RUN_FILE).read_text())["run_id"]
        if row["status"] == "finished" and (tdir / RESULT_FILE).exists():
            d = json.loads((tdir / RESULT_FILE).read_text())
            row.update(
                violations="; ".join(d["violations"]), checkpoint_dir=d["checkpoint_dir"], model_dir=d["model_dir"]
            )
        if res.error is not None:
            row["error"] = _error_text(res.error)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


# ---------------------------------------------------------------------------------------------------- flow
def _warn_weight_zero(cfg: SweepConfig) -> None:
    """Warns when λ = 0 trials would repeat each other across the MLC-only axes of the space."""
    mlc_only = [k for k in ("mixture", "m", "tau", "layer") if getattr(cfg.space, k) is not None]
    if cfg.space.weight is not None and 0 in cfg.space.weight.values and mlc_only:
        log.warning(
            "space.weight includes λ = 0: those trials train the alignment loss alone and ignore %s, so "
            "they are equivalent across those values (one λ = 0 control is enough: `raysafe train` with "
            "mlc.weight=0)",
            ", ".join(f"space.{k}" for k in mlc_only),
        )


def _validate_combos(cfg: SweepConfig, base: TrainConfig, named: dict) -> int | None:
    """Runs the train flow's checks on every (mixture, m) combination; returns the trials' total training steps."""
    from raysafe.train.flow import total_steps, validate

    ms = cfg.space.m.values if cfg.space.m is not None else [base.mixture.m]
    combos = [(name, m) for name in named for m in ms] if cfg.space.mixture is not None else [(None, m) for m in ms]
    steps = None
    first = {k: a.values[0] for k, a in cfg.space.axes().items()}
    for name, m in combos:
        params = {**first, "m": m, **({"mixture": name} if name is not None else {})}
        if "layer" in params and cfg.space.layer is not None and cfg.space.layer.kind == "uniform":
            params["layer"] = float(params["layer"])
        tcfg = trial_train_config(
            base,
            params,
            named,
            {
                "ray.num_workers": cfg.resources.num_workers,
                "ray.use_gpu": cfg.resources.use_gpu,
                "ray.cpus_per_worker": cfg.resources.cpus_per_worker,
            },
        )
        try:
            samples, _ = validate(tcfg)
        except RaysafeError as e:
            where = f"space.mixture={name}, m={m}" if name is not None else f"train.mixture, m={m}"
            raise _wrap(e, where) from None
        if steps is None:
            steps = total_steps(tcfg, samples.height)
    return steps


def _check_scheduler(cfg: SweepConfig, steps: int) -> None:
    """ASHA needs a grace period below the trials' training steps (it sees every step: Train reports each)."""
    sch = cfg.scheduler
    if sch.kind == "asha":
        if sch.grace_period >= steps:
            raise ConfigError(
                f"ASHA grace period {sch.grace_period} is not below the trials' {steps} training steps",
                where="scheduler.grace_period",
                fix=f"use a grace period below {steps}",
            )


def _consistency_setup(cfg: SweepConfig, base: TrainConfig, depth: int) -> dict[str, Any] | None:
    """The held-out consistency check's spec, rows, languages and layer (None when it is off)."""
    c = cfg.evaluation.consistency
    if not c.enabled:
        return None
    from raysafe.models.layers import resolve_layer
    from raysafe.sweep.heldout import heldout_rows

    langs = c.languages or list(base.mixture.languages)
    layer_spec = c.layer if c.layer is not None else base.mlc.layer
    try:
        layer = resolve_layer(layer_spec, depth, where="evaluation.consistency.layer")
    except RaysafeError as e:
        raise _wrap(e, "evaluation.consistency.layer") from None
    variants = c.variants or base.data.variants
    variants = type(variants).model_validate(_absolute(variants.model_dump(mode="json")))
    try:
        rows = heldout_rows(variants, c.split, langs, c.max_items)
    except RaysafeError as e:
        raise _wrap(e, "evaluation.consistency") from None
    return {
        "spec": c.model_dump(mode="json"),
        "rows": rows.to_dicts(),
        "languages": langs,
        "layer": layer,
    }


def prepare(cfg: SweepConfig) -> dict[str, Any]:
    """Every check that needs no trial: space vs model depth and languages, data per (mixture, m), evaluation
    and held-out sets. Returns what the driver needs (the named mixtures, total steps, held-out rows, ...)."""
    from raysafe.models.loading import model_depth

    base = TrainConfig.model_validate(_absolute(cfg.base.model_dump(mode="json")))
    try:
        depth = model_depth(base.model)
    except RaysafeError as e:
        raise _wrap(e, "train.model") from None
    named = validate_space(cfg.space, base, depth)
    _warn_weight_zero(cfg)
    steps = _validate_combos(cfg, base, named)
    _check_scheduler(cfg, steps)
    out: dict[str, Any] = {"base": base, "named": named, "depth": depth, "total_steps": steps, "consistency": None}
    out["consistency"] = _consistency_setup(cfg, base, depth)
    return out


def run_sweep(cfg: SweepConfig, progress: bool = True, restart: bool = False) -> SweepResult:
    """Validate, run (or resume) the sweep with Ray Tune, and report it; see the module docstring. The sweep
    directory is locked while the sweep runs (which covers its trials' training runs); ``restart`` moves an
    existing one aside (``<dir>.replaced-<UTC time>``) and starts afresh."""
    from raysafe.locks import move_aside, output_lock

    t0 = time.perf_counter()
    if cfg.evaluation.enabled:  # the trials' generation backend can run (vllm installed), before any training
        from raysafe.evaluate.flow import check_generation_backend

        check_generation_backend(
            cfg.evaluation.evaluate.get("generation", {}), "evaluation.evaluate.generation.backend"
        )
    prep = prepare(cfg)  # before anything is written
    sweep_dir = (Path(cfg.output_dir) / cfg.name).resolve()
    with output_lock(sweep_dir, f"sweep {sweep_dir}"):
        if restart:
            move_aside(sweep_dir)
        return _run_sweep(cfg, prep, progress, t0)


def _evaluate_template(cfg: SweepConfig, base: TrainConfig, sweep_dir: Path, tspec: dict):
    """The evaluate config trials and the baseline share (the baseline's own model and directory), or None."""
    if not cfg.evaluation.enabled:
        return None
    return cfg.evaluate_config(
        base.model.model_dump(mode="json"),
        str(sweep_dir / "baseline" / "evaluate"),
        f"base-{base.model.label}",
        tspec,
    )


def _sweep_state(cfg: SweepConfig, sweep_dir: Path) -> tuple[Path, dict, dict, str]:
    """(state path, saved state, identity, fingerprint); refuses a directory that holds another sweep."""
    state_path = sweep_dir / "sweep_state.json"
    identity = _identity(cfg)
    fp = digest(identity)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and state.get("fingerprint") != fp:
        diff = differences(state.get("identity") or {}, identity)
        raise OutputError(
            f"{sweep_dir} holds another sweep (its search space, base config, scheduler, objective or evaluation "
            "differ); differing fields (old → new):\n    " + "\n    ".join(diff[:12]),
            where=str(state_path),
            fix="give the sweep a new `name` (--set name=NEW_NAME), or `--restart` to move the old sweep aside "
            "and start afresh",
        )
    return state_path, state, identity, fp


def _baseline(cfg: SweepConfig, state: dict, state_path: Path, ev_template, parent_id, progress: bool) -> dict:
    """The base model's evaluation metrics: evaluated once per sweep, kept in the state across a resume."""
    baseline: dict[str, float] = dict(state.get("baseline") or {})
    if cfg.evaluation.enabled and cfg.evaluation.baseline and not baseline:  # once per sweep, kept on resume
        from raysafe.evaluate.flow import run_evaluate

        ev = run_evaluate(ev_template, parent_run_id=parent_id, progress=progress)
        baseline = M.eval_metrics(ev.per_language, ev.summary_table, cfg.evaluation.set, cfg.evaluation.judge)
        tracking.log_metrics({f"baseline_{k}": v for k, v in baseline.items() if not math.isnan(v)})
        state["baseline"] = baseline
        atomic_write_json(state_path, state)
    return baseline


def _fixed_train_settings(cfg: SweepConfig, sweep_dir: Path, tspec: dict) -> dict[str, Any]:
    """The train config overrides every trial gets (resources, capacity, storage, tracking, the checkpoint interval
    under ASHA)."""
    r = cfg.resources
    fixed: dict[str, Any] = {
        "ray.num_workers": r.num_workers,
        "ray.cpus_per_worker": r.cpus_per_worker,
        "ray.use_gpu": r.use_gpu,
        "ray.address": None,
        "ray.capacity": cfg.ray.capacity,
        "checkpoint.storage_path": str(sweep_dir / "train"),
        "tracking": tspec,
    }
    if r.torch_threads is not None:
        fixed["ray.torch_threads"] = r.torch_threads
    if cfg.scheduler.kind == "asha":
        fixed["checkpoint.every_n_steps"] = cfg.scheduler.report_every_n_steps
    return fixed


def _trial_context(cfg, prep, sweep_dir: Path, tspec: dict, parent_id, ev_template, baseline: dict):
    """What every trial receives (``raysafe.sweep.trial.TrialContext``)."""
    from raysafe.sweep.trial import TrialContext

    return TrialContext(
        base=prep["base"].model_dump(mode="json"),
        named=prep["named"],
        fixed=_fixed_train_settings(cfg, sweep_dir, tspec),
        sweep_dir=str(sweep_dir),
        tracking=tspec,
        parent_run_id=parent_id,
        objective=cfg.objective.model_dump(mode="json"),
        evaluate=(
            {
                k: v
                for k, v in ev_template.model_dump(mode="json").items()
                if k not in ("models", "output_dir", "tracking")
            }
            if ev_template is not None
            else None
        ),
        eval_set=cfg.evaluation.set,
        eval_judge=cfg.evaluation.judge,
        baseline=baseline,
        consistency=prep["consistency"],
        total_steps=prep["total_steps"],
        depth=prep["depth"],
    )


def _new_tuner(cfg: SweepConfig, prep: dict, trainable, sweep_dir: Path, exp_path: Path, concurrent, progress: bool):
    """A fresh Tune experiment: search space, optional ASHA (its rung records started empty), concurrency cap."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raysafe.sweep.scheduler import ResumableASHA

    scheduler = None
    asha_state = sweep_dir / "asha_state.pkl"
    asha_state.unlink(missing_ok=True)  # a new Tune experiment starts with empty rungs
    if cfg.scheduler.kind == "asha":
        s = cfg.scheduler
        scheduler = ResumableASHA(
            str(asha_state),
            time_attr="train_step",
            metric=s.metric,
            mode=s.mode,
            max_t=prep["total_steps"],
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg.space, prep["named"], cfg.search.algorithm),
        tune_config=tune.TuneConfig(
            num_samples=cfg.search.num_samples,
            scheduler=scheduler,
            # the generator itself caps the trials in flight (Tune ignores TuneConfig.max_concurrent_trials
            # when it is given a SearchGenerator such as this one)
            search_alg=BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=concurrent),
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=exp_path.name,
            storage_path=str(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            verbose=1 if progress else 0,
        ),
    )


def _fit(cfg: SweepConfig, prep: dict, ctx, sweep_dir: Path, exp_path: Path, resumed: bool, concurrent, progress):
    """Runs the trials: restores the Tune experiment when there is one, else starts a new one."""
    from ray import tune

    from raysafe.sweep.trial import run_trial

    r = cfg.resources
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx), {"CPU": r.driver_cpus, "memory": r.driver_memory_mb * 2**20}
    )
    if resumed:
        log.info("resuming the sweep in %s: finished trials are kept, unfinished ones run again", exp_path)
        tuner = tune.Tuner.restore(str(exp_path), trainable, resume_unfinished=True, restart_errored=cfg.retry_errored)
    else:
        tuner = _new_tuner(cfg, prep, trainable, sweep_dir, exp_path, concurrent, progress)
    with remote_errors():
        return tuner.fit()


def _close_stopped_runs(rows: list[dict]) -> None:
    """The scheduler ended these trials' processes mid-run: their MLflow runs are closed here."""
    for row in rows:
        if row["status"] == "stopped" and row.get("mlflow_run_id"):
            tracking.end_run(
                row["mlflow_run_id"],
                "KILLED",
                {"raysafe.trial_status": f"stopped by the scheduler after step {int(row['train_step'])}"},
            )


def _write_best_config(cfg: SweepConfig, base: TrainConfig, best: dict, sweep_dir: Path) -> Path:
    """``best_train_config.yaml``: the best trial's train config, ready for ``raysafe train``."""
    from raysafe.sweep import report as R
    from raysafe.sweep.trial import trial_dir

    trial_cfg = load_config(TrainConfig, trial_dir(sweep_dir, best["trial_id"]) / "train_config.yaml")
    text = R.best_train_config(
        trial_cfg, f"{cfg.name}-best", base.checkpoint.storage_path, cfg.base.tracking.model_dump(mode="json")
    )
    path = sweep_dir / "best_train_config.yaml"
    header = (
        f"# best trial {best['trial_id']} of sweep {cfg.name} (objective {best['objective']:.6g}); "
        f"run: raysafe train {path}\n"
    )
    atomic_write_bytes(path, (header + text).encode())
    return path


def _write_outputs(cfg: SweepConfig, base: TrainConfig, rows: list[dict], sweep_dir: Path, param_keys: list[str]):
    """Results table, Pareto plot and best train config; returns (table, best row or None, paths)."""
    from raysafe.sweep import report as R

    table = R.results_table(rows, cfg.objective, param_keys)
    paths: dict[str, Path] = {}
    paths["results_parquet"], paths["results_csv"] = write_table(table, sweep_dir, "results")
    paths["pareto_plot"] = R.pareto_plot(
        table,
        cfg.objective,
        sweep_dir / "pareto.png",
        f"sweep {cfg.name}: {table.height} trials, Pareto front over "
        f"{', '.join(t.metric for t in cfg.objective.pareto)}",
        param_keys,
    )
    best = table.filter(pl.col("best")).row(0, named=True) if table.height and table["best"].any() else None
    if best is not None:
        paths["best_config"] = _write_best_config(cfg, base, best, sweep_dir)
    return table, best, paths


def _log_outcome(table: pl.DataFrame, best: dict | None, paths: dict[str, Path], sweep_dir: Path) -> None:
    """Trial counts by status, the best objective and the output files, to the MLflow parent run."""
    counts = dict(table.group_by("status").len().iter_rows()) if table.height else {}
    tracking.log_metrics({f"trials_{k.replace(' ', '_')}": float(v) for k, v in counts.items()})
    if best is not None:
        tracking.log_metrics({"best_objective": float(best["objective"])})
        tracking.set_tags({"raysafe.best_trial": best["trial_id"]})
    for key in ("results_parquet", "results_csv", "pareto_plot", "best_config", "summary"):
        if key in paths:
            tracking.log_artifact(paths[key])
    tracking.log_artifact(sweep_dir / "sweep_config.yaml")


def _log_sweep_params(cfg: SweepConfig, prep: dict[str, Any], planned: int) -> None:
    """The sweep config, planned trials, total steps and model depth, as the parent run's parameters."""
    tracking.log_params(
        {
            "config": cfg.model_dump(mode="json"),
            "planned_trials": planned,
            "total_steps": prep["total_steps"],
            "model_depth": prep["depth"],
        }
    )
    if prep["consistency"] is not None:  # the trials' training data are logged by their training runs
        from raysafe.sweep.heldout import log_heldout_input

        log_heldout_input(
            cfg.evaluation.consistency.variants or prep["base"].data.variants, prep["consistency"]["rows"]
        )


def _run_sweep(cfg: SweepConfig, prep: dict[str, Any], progress: bool, t0: float) -> SweepResult:
    from ray import tune

    from raysafe.config import RaySpec
    from raysafe.runtime import ensure_ray

    base: TrainConfig = prep["base"]
    sweep_dir = (Path(cfg.output_dir) / cfg.name).resolve()
    tspec = _tracking_spec(cfg.tracking)
    ev_template = _evaluate_template(cfg, base, sweep_dir, tspec)
    # ---- the sweep directory belongs to this sweep
    state_path, state, identity, fp = _sweep_state(cfg, sweep_dir)
    ensure_ray(RaySpec(address=cfg.ray.address))
    concurrent = _check_resources(cfg, ev_template)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(sweep_dir / "sweep_config.yaml", dump_config(cfg).encode())
    named = prep["named"]
    param_keys = list(cfg.space.axes()) + (["mixture"] if cfg.space.mixture is not None else [])
    planned = grid_size(cfg.space, named, cfg.search.algorithm) * cfg.search.num_samples
    exp_path = sweep_dir / "tune"
    resumed = tune.Tuner.can_restore(str(exp_path))
    spec = TrackingSpec.model_validate(tspec)

    with tracking.run(
        spec, f"sweep {cfg.name}", tags={"raysafe.flow": "sweep"}, resume_run_id=state.get("parent_run_id")
    ) as parent:
        parent_id = parent.info.run_id if parent is not None else None
        state.update(fingerprint=fp, identity=identity, parent_run_id=parent_id, planned_trials=planned)
        atomic_write_json(state_path, state)
        _log_sweep_params(cfg, prep, planned)
        baseline = _baseline(cfg, state, state_path, ev_template, parent_id, progress)
        ctx = _trial_context(cfg, prep, sweep_dir, tspec, parent_id, ev_template, baseline)
        results = _fit(cfg, prep, ctx, sweep_dir, exp_path, resumed, concurrent, progress)

        # ---- report
        rows = _rows(results, sweep_dir, param_keys)
        if parent is not None:
            _close_stopped_runs(rows)
        table, best, paths = _write_outputs(cfg, base, rows, sweep_dir, param_keys)
        result = SweepResult(
            sweep_dir,
            table,
            best,
            paths,
            planned,
            resumed,
            time.perf_counter() - t0,
            parent_id,
            cfg.objective,
            param_keys,
        )
        atomic_write_bytes(sweep_dir / "summary.txt", (result.summary() + "\n").encode())
        paths["summary"] = sweep_dir / "summary.txt"
        if parent is not None:
            _log_outcome(table, best, paths, sweep_dir)
    return result
