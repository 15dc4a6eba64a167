"""`StudyConfig`: one model, and the settings of each stage of the closed loop.

The stage sections (``train``, ``separation``, ``concepts``, ``evaluate``) are the flows' own configs without the
fields the study fills in itself (models, output and activation directories, tracking, Ray address). They are
validated when the study config is loaded, so a typo in any stage fails before the first stage runs, with the stage
named in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from raysafe.config import ModelSpec, RaySpec, Strict, TrackingSpec
from raysafe.train.config import TrainConfig

STAGES = ("separation", "concepts", "evaluate", "train", "consistency", "report")


class StudyConfig(Strict):
    """`raysafe study`: base model → extraction, separation, concepts, safety evaluation → MLC training (and the
    λ = 0 control) → the same analyses of each trained checkpoint → a before/after report, all in one MLflow parent
    run. A stage whose output exists is reused unless listed in ``force``."""

    model: ModelSpec
    output_dir: str = "outputs/study"
    control: bool = Field(False, description="also train the λ = 0 control (same seed and data) and analyse it")
    force: list[str] = Field(default_factory=list, description=f"stages to redo although their output exists: {STAGES}")
    skip: list[str] = Field(default_factory=list, description="analyses to leave out: separation, concepts, evaluate")
    consistency_split: str | None = Field(
        "test",
        description="held-out split of the safety prompts for the cross-lingual consistency of the trained models",
    )
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields (model is the study's)")
    separation: dict[str, Any] = Field(default_factory=dict, description="SeparationConfig fields (models filled in)")
    concepts: dict[str, Any] = Field(default_factory=dict, description="ConceptsConfig fields (models filled in)")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="EvaluateConfig fields (models filled in)")
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec(experiment="raysafe-study")

    _checked: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _stages_valid(self) -> "StudyConfig":
        bad = [s for s in self.force if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) in force: {bad}; stages are {list(STAGES)}")
        bad = [s for s in self.skip if s not in ("separation", "concepts", "evaluate")]
        if bad:
            raise ValueError(f"unknown analysis in skip: {bad}; choose from separation, concepts, evaluate")
        for key in ("model", "tracking"):
            if key in self.train:
                raise ValueError(f"train.{key} is set by the study; remove it from the train section")
        # build each stage's config once now, so that errors surface before any work
        self.train_config("mlc", self.model)
        self.separation_config(self.model, [])
        self.concepts_config([self.model], "before")
        self.evaluate_config([self.model], "before")
        return self

    # ------------------------------------------------------------------------------------- per-stage configs
    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def _build(self, cls, section: str, tree: dict[str, Any]):
        from pydantic import ValidationError

        try:
            return cls.model_validate(tree)
        except ValidationError as e:
            lines = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                lines.append(f"{section}.{loc}: {err['msg']} (value {err.get('input')!r})")
            raise ValueError("; ".join(lines)) from None

    def train_config(self, which: str, model: ModelSpec) -> TrainConfig:
        tree = {**self.train, "model": model.model_dump(), "tracking": self.tracking.model_dump()}
        ck = dict(tree.get("checkpoint") or {})
        ck.update(storage_path=str(self.root / "train"), name=which)
        tree["checkpoint"] = ck
        ray = dict(tree.get("ray") or {})
        ray.setdefault("address", self.ray.address)
        tree["ray"] = ray
        if which == "control":
            tree["mlc"] = {**(tree.get("mlc") or {}), "weight": 0.0}
        return self._build(TrainConfig, "train", tree)

    def _common(self, section: dict[str, Any]) -> dict[str, Any]:
        ray = {**self.ray.model_dump(), **(section.get("ray") or {})}
        return {**section, "ray": ray, "tracking": self.tracking.model_dump()}

    def separation_config(self, base: ModelSpec, aligned: list[ModelSpec]):
        from raysafe.separation.config import SeparationConfig

        tree = {
            **self._common(self.separation),
            "base": base.model_dump(),
            "aligned": [m.model_dump() for m in aligned],
            "activations_dir": str(self.root / "activations"),
            "output_dir": str(self.root / ("separation_after" if aligned else "separation_before")),
        }
        return self._build(SeparationConfig, "separation", tree)

    def concepts_config(self, models: list[ModelSpec], phase: str):
        from raysafe.concepts.config import ConceptsConfig

        tree = {
            **self._common(self.concepts),
            "models": [m.model_dump() for m in models],
            "activations_dir": str(self.root / "activations" / "concepts"),
            "output_dir": str(self.root / f"concepts_{phase}"),
        }
        return self._build(ConceptsConfig, "concepts", tree)

    def evaluate_config(self, models: list[ModelSpec], phase: str):
        from raysafe.evaluate.config import EvaluateConfig

        tree = {
            **self._common(self.evaluate),
            "models": [m.model_dump() for m in models],
            "output_dir": str(self.root / f"evaluate_{phase}"),
        }
        return self._build(EvaluateConfig, "evaluate", tree)
