"""The sweep flow's typed config: base train config, search space, scheduler, trial resources, evaluation, objective."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from raysafe.config import (
    Strict,
    TrackingSpec,
    capacity_field,
    load_config,
)
from raysafe.errors import ConfigError
from raysafe.sweep import metrics as M
from raysafe.sweep.heldout import ConsistencySpec
from raysafe.sweep.objective import ObjectiveSpec
from raysafe.sweep.space import SearchSpace
from raysafe.train.config import TrainConfig


# --------------------------------------------------------------------------------------------------- config
class SearchSpec(Strict):
    algorithm: Literal["grid", "random"] = Field(
        "grid",
        description="grid: every combination of the grid keys (choice/range keys drawn per trial); "
        "random: every key drawn per trial",
    )
    num_samples: int = Field(1, ge=1, description="grid: repeats of the whole grid; random: number of trials")
    seed: int | None = Field(0, description="seed of the draws (None: unseeded)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once (default: as many as the cluster's CPUs / GPUs fit)"
    )


class SchedulerSpec(Strict):
    kind: Literal["none", "asha"] = "none"
    metric: Literal["train_loss_align", "train_loss_total"] = Field(
        "train_loss_align",
        description="intermediate metric ASHA compares at each rung (reported by Train at every step)",
    )
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1, description="training steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    report_every_n_steps: int = Field(
        1,
        ge=1,
        description="checkpoint interval of the trials under ASHA, in steps (every step is reported to Tune, "
        "checkpointed or not)",
    )


class TrialResources(Strict):
    """Per trial: the Ray Train workers (override the base config's ``ray``) and the trial's own driver process."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int | None = Field(None, ge=1, description="torch threads per train worker (default: base config)")
    driver_cpus: float = Field(
        0.0, ge=0, description="CPUs the trial's driver process reserves (it only launches and watches the Train run)"
    )
    driver_memory_mb: int = Field(256, ge=1, description="memory the trial's driver process reserves")


class SweepEvaluation(Strict):
    enabled: bool = True
    evaluate: dict[str, Any] = Field(
        default_factory=dict,
        description="EvaluateConfig fields (models, output_dir and tracking are filled in by the sweep)",
    )
    set: str | None = Field(None, description="set whose safety feeds safety_* (default: the first)")
    judge: str | None = Field(None, description="judge whose verdicts count (default: the first)")
    baseline: bool = Field(True, description="evaluate the base model once, for utility_drop and safety_gain")
    consistency: ConsistencySpec = ConsistencySpec()


class SweepRaySpec(Strict):
    address: str | None = None
    capacity: dict[str, float] | None = capacity_field()


class SweepConfig(Strict):
    """`raysafe sweep`: Ray Tune over the MLC training config, each trial trained, evaluated and scored."""

    name: str = Field("sweep", description="sweep name: its directory under output_dir and its MLflow run name")
    train: str | dict[str, Any] = Field(description="the base train config: a YAML path or an inline mapping")
    train_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted TrainConfig fields set on the base, like `raysafe train --set` "
        "(e.g. {optim.max_steps: 400} to shorten every trial)",
    )
    space: SearchSpace = SearchSpace()
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: TrialResources = TrialResources()
    objective: ObjectiveSpec = ObjectiveSpec()
    evaluation: SweepEvaluation = SweepEvaluation()
    output_dir: str = "outputs/sweeps"
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial")
    retry_errored: bool = Field(False, description="on resume, run errored trials again from scratch")
    ray: SweepRaySpec = SweepRaySpec()
    tracking: TrackingSpec = TrackingSpec(experiment="raysafe-sweep")

    _base: TrainConfig | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _checks(self) -> "SweepConfig":
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"name is a directory name: no '/', '\\' or spaces (got {self.name!r})")
        self._base = self._load_base()
        ev = self.evaluation
        langs: list[str] = []
        if ev.enabled:  # built once here so that a bad evaluation section fails when the config is loaded
            ecfg = self.evaluate_config(self._base.model.model_dump(), "check", "check")
            langs = ecfg.languages or []
            sets, judges = [x.name for x in ecfg.sets], [j.label for j in ecfg.judges]
            if ev.set is not None and ev.set not in sets:
                raise ValueError(f"evaluation.set {ev.set!r} is not one of the evaluation's sets {sets}")
            if ev.judge is not None and ev.judge not in judges:
                raise ValueError(f"evaluation.judge {ev.judge!r} is not one of the evaluation's judges {judges}")
        known = M.known_metrics(
            ev.enabled, ev.enabled and ev.baseline, ev.consistency.enabled, langs or list(self._base.mixture.languages)
        )
        for name in self.objective.metrics():
            if name not in known:
                raise ValueError(
                    f"objective metric {name!r} is not reported by this sweep's trials; reported: "
                    f"{sorted(n for n in known if not n.startswith('safety_') or n in M.EVAL_METRICS)} "
                    f"(+ safety_<lang>); evaluation.enabled={ev.enabled}, baseline={ev.baseline}, "
                    f"consistency.enabled={ev.consistency.enabled}"
                )
        return self

    def _load_base(self) -> TrainConfig:
        from raysafe.sweep.space import apply_overrides

        # Local paths become absolute here; whether they exist is checked where the sweep runs (the train flow
        # resolves the model and reads the data before any work), so `--print-config` validates a cluster sweep anywhere.
        try:
            if isinstance(self.train, str):
                base = load_config(TrainConfig, self.train, check_paths=False)
            else:
                base = load_config(TrainConfig, data=self.train, check_paths=False)
        except ConfigError as e:
            raise ValueError(f"train (the base train config): {e.what}") from None
        if not self.train_overrides:
            return base
        try:
            return TrainConfig.model_validate(apply_overrides(base.model_dump(mode="json"), self.train_overrides))
        except ValidationError as e:
            lines = [
                f"train_overrides: {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (value {err.get('input')!r})"
                for err in e.errors()
            ]
            raise ValueError("; ".join(lines)) from None

    @property
    def base(self) -> TrainConfig:
        assert self._base is not None
        return self._base

    def evaluate_config(self, model: dict, output_dir: str, name: str, tracking_spec: dict | None = None):
        from raysafe.evaluate.config import EvaluateConfig

        for key in ("models", "output_dir", "tracking"):
            if key in self.evaluation.evaluate:
                raise ValueError(f"evaluation.evaluate.{key} is set by the sweep; remove it")
        tree = {
            **self.evaluation.evaluate,
            "models": [{**model, "name": name}],
            "output_dir": output_dir,
            "tracking": tracking_spec or self.tracking.model_dump(),
        }
        try:
            return EvaluateConfig.model_validate(tree)
        except ValidationError as e:
            lines = [
                f"evaluation.evaluate.{'.'.join(str(x) for x in err['loc'])}: {err['msg']} (value {err.get('input')!r})"
                for err in e.errors()
            ]
            raise ValueError("; ".join(lines)) from None
