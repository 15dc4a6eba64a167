"""One trial of a sweep, as a Ray Tune function trainable: train → evaluate → held-out consistency → report.

The trial process is only a driver (it reserves little CPU): ``run_train`` fits a Ray Train V2 ``TorchTrainer``
with the trial's resources, ``run_evaluate`` starts its own actor pool, the consistency measure a Ray task. Tune
learns about training through Ray's own Train → Tune path: the trainer's RunConfig carries a
:class:`TrialReportCallback` (Ray's ``TuneReportCallback``), so every ``ray.train.report`` of the workers — one per
optimiser step, checkpointed or not — reaches Tune as an intermediate result (``train_step`` + ``train_*``
metrics), which is what ASHA prunes on; when ASHA stops the trial, Tune ends this process and, with it, the Train
run it owns.

The Train run is named after the Tune trial id (``trial_<id>`` under ``<sweep>/train``), so a trial restarted by
``Tuner.restore`` resumes its training from its own latest checkpoint. MLflow: one child run of the sweep's
parent per trial (its params, intermediate and final metrics), with the trial's training and evaluation runs as
its children; a restarted trial continues the same child run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raysafe import tracking
from raysafe.atomic import atomic_write_bytes, atomic_write_json
from raysafe.config import TrackingSpec, dump_config
from raysafe.sweep import metrics as M
from raysafe.sweep.objective import ObjectiveSpec, score, violations
from raysafe.sweep.space import trial_train_config
from raysafe.train.config import TrainConfig

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ATTEMPTS_FILE = "attempts.jsonl"
RUN_FILE = "mlflow_run.json"


@dataclass
class TrialContext:
    """What every trial needs besides its params (passed once through the object store)."""

    base: dict  # the base TrainConfig (JSON), paths absolute
    named: dict[str, dict]  # mixture name -> MixtureSpec fields
    fixed: dict[str, Any]  # dotted TrainConfig overrides shared by all trials (resources, storage, checkpointing)
    sweep_dir: str
    tracking: dict  # TrackingSpec (JSON), URI absolute
    parent_run_id: str | None
    objective: dict  # ObjectiveSpec (JSON)
    evaluate: dict | None = None  # EvaluateConfig fields except models / output_dir / tracking; None: no evaluation
    eval_set: str | None = None
    eval_judge: str | None = None
    baseline: dict[str, float] = field(default_factory=dict)  # the base model's eval metrics (for deltas)
    consistency: dict | None = None  # {"spec": ConsistencySpec JSON, "rows": [...], "languages": [...], "layer": int}
    total_steps: int = 0
    depth: int = 0  # decoder layers of the policy (for the resolved MLC layer in the params)


def trial_dir(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


class TrialReportCallback(TuneReportCallback):
    """Ray's Train → Tune bridge, with the sweep's metric names: every report of rank 0 (one per optimiser step) is
    renamed to ``train_step`` + ``train_*`` (:func:`raysafe.sweep.metrics.train_metrics`), logged to the trial's
    MLflow run at its step and handed to Tune, except the last step, which the trial reports once, with its
    evaluation, as the final result. Built in the Tune function (it takes the trial's result queue); runs in the
    Train controller."""

    def __init__(self, total_steps: int, mlflow: dict | None):
        super().__init__()
        self._total_steps = total_steps
        self._mlflow = {**mlflow, "system_metrics": False} if mlflow else None  # the trial's process samples those
        self._run = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        step = int(metrics[0]["step"])
        if step >= self._total_steps:
            return
        out = M.train_metrics(metrics[0], step)
        if self._run is None:
            self._run = tracking.attach(self._mlflow)
        self._run.log_metrics(out, step=step)
        super().after_report(run_context, [{**out, "final": 0.0}], checkpoint)


def _child_run_id(tdir: Path) -> str | None:
    p = tdir / RUN_FILE
    return json.loads(p.read_text())["run_id"] if p.exists() else None


def _record_attempt(tdir: Path, config: dict) -> None:
    """Appends this attempt's start time and parameters to the trial's attempts.jsonl."""
    tdir.mkdir(parents=True, exist_ok=True)
    with open(tdir / ATTEMPTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"started": time.time(), "params": config}) + "\n")


def _attach_child_run(tdir: Path, child_id: str, trial_id: str, params: dict, cfg: TrainConfig, ctx) -> None:
    """Closes the runs of a cut-short attempt, records the trial's MLflow run id and logs its parameters."""
    if (tdir / RUN_FILE).exists():  # a restarted trial: runs of the attempt that was cut short
        for stale in tracking.running_children(child_id):
            tracking.end_run(stale, "KILLED", {"raysafe.note": "attempt cut short; the trial was restarted"})
    atomic_write_json(tdir / RUN_FILE, {"run_id": child_id})
    tracking.log_params(
        {
            "trial_id": trial_id,
            **{f"param.{k}": v for k, v in params.items()},
            "mixture.languages": ",".join(cfg.mixture.languages),
            "mixture.weights": cfg.mixture.weights,
            "mixture.m": cfg.mixture.m,
            "mlc.layer": cfg.mlc.layer,
            "mlc.layer_resolved": cfg.mlc.resolve_layer(ctx.depth) if ctx.depth else None,
        }
    )


def _trial_metrics(res, ctx: TrialContext, tdir: Path, trial_id: str, child_id: str | None) -> dict:
    """Training metrics, then the evaluation (and deltas to the baseline) and held-out consistency when on."""
    out = M.train_metrics(res.metrics, res.steps)
    if ctx.evaluate is not None:
        out.update(_evaluate(res.model_dir, ctx, tdir, trial_id, child_id))
        if ctx.baseline:
            out.update(M.baseline_deltas(out, ctx.baseline))
    if ctx.consistency is not None:
        from raysafe.sweep.heldout import ConsistencySpec, measure_remote

        c = ctx.consistency
        out.update(
            measure_remote(
                str(res.model_dir), c["rows"], c["languages"], c["layer"], ConsistencySpec.model_validate(c["spec"])
            )
        )
    return out


def _write_result(tdir: Path, trial_id: str, params: dict, out: dict, broken: list, res, child_id) -> None:
    """The trial's result.json: parameters, metrics, violated constraints, checkpoint and run ids."""
    atomic_write_json(
        tdir / RESULT_FILE,
        {
            "trial_id": trial_id,
            "params": params,
            "metrics": json.loads(json.dumps(out, default=float)),  # numpy scalars as floats
            "violations": broken,
            "checkpoint_dir": str(res.checkpoint_dir),
            "model_dir": str(res.model_dir),
            "train_run_id": res.mlflow_run_id,
            "mlflow_run_id": child_id,
        },
    )


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable (``tune.with_parameters(run_trial, ctx=...)``)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    tdir = trial_dir(ctx.sweep_dir, trial_id)
    _record_attempt(tdir, config)
    params = dict(config)
    fixed = {**ctx.fixed, "checkpoint.name": f"trial_{trial_id}"}
    cfg = trial_train_config(TrainConfig.model_validate(ctx.base), params, ctx.named, fixed)
    atomic_write_bytes(tdir / "train_config.yaml", dump_config(cfg).encode())
    objective = ObjectiveSpec.model_validate(ctx.objective)
    spec = TrackingSpec.model_validate(ctx.tracking)
    label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    with tracking.run(
        spec,
        f"trial {trial_id} ({label})",
        parent_run_id=ctx.parent_run_id,
        tags={"raysafe.flow": "sweep-trial", "raysafe.trial_id": trial_id},
        resume_run_id=_child_run_id(tdir),
    ) as child:
        child_id = child.info.run_id if child is not None else None
        if child_id:
            _attach_child_run(tdir, child_id, trial_id, params, cfg, ctx)
        res = _train(cfg, ctx, tracking.attach_info(spec, child), child_id)
        out = _trial_metrics(res, ctx, tdir, trial_id, child_id)
        out["objective"] = score(out, objective.primary, objective.terms)
        broken = violations(out, objective.constraints)
        out["feasible"] = 0.0 if broken else 1.0
        if child_id:
            tracking.set_tags(
                {"raysafe.violations": "; ".join(broken) or "none", "raysafe.checkpoint": str(res.checkpoint_dir)}
            )
        _write_result(tdir, trial_id, params, out, broken, res, child_id)
        tracking.log_metrics(out, step=res.steps)
    # Reported after the trial's MLflow run is closed: at the last step ASHA answers STOP (the trial is at max_t or
    # at a rung), which ends this function with SystemExit; the trial is complete by then.
    tune.report({**out, "final": 1.0})


def _train(cfg: TrainConfig, ctx: TrialContext, mlflow: dict | None, child_id: str | None):
    """The trial's training run (a child of its MLflow run), every step reported to Tune as it finishes. When the
    scheduler stops the trial, Tune ends this process and the Train run it owns; the sweep's driver then tags and
    closes the trial's MLflow runs."""
    from raysafe.train.flow import run_train

    with tracking.parent_run(child_id):
        return run_train(
            cfg,
            progress=False,
            lock=False,  # the sweep's lock covers its trials
            callbacks=[TrialReportCallback(ctx.total_steps, mlflow)],
        )


def _evaluate(model_dir: Path, ctx: TrialContext, tdir: Path, trial_id: str, child_id: str | None) -> dict:
    from raysafe.evaluate.config import EvaluateConfig
    from raysafe.evaluate.flow import run_evaluate

    ecfg = EvaluateConfig.model_validate(
        {
            **ctx.evaluate,
            "models": [{"path": str(model_dir), "name": f"trial-{trial_id}"}],
            "output_dir": str(tdir / "evaluate"),
            "tracking": {**ctx.tracking, "run_name": None},
        }
    )
    ev = run_evaluate(ecfg, parent_run_id=child_id, progress=False, lock=False)  # the sweep's lock covers it
    return M.eval_metrics(ev.per_language, ev.summary_table, ctx.eval_set, ctx.eval_judge)
