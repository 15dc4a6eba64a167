"""The separation flow's typed config: model families (base + aligned), data, layers, metrics, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raysafe.config import (
    ModelSpec,
    RaySpec,
    SourceSpec,
    Strict,
    TrackingSpec,
)
from raysafe.extract.config import ExtractSpec
from raysafe.separation.tables import (
    SeparationOptions,
)


class ModelFamily(Strict):
    """A base model and its aligned counterparts (hub ids, local directories, training outputs)."""

    base: ModelSpec
    aligned: list[ModelSpec] = Field(default_factory=list)


class SeparationConfig(Strict):
    """`raysafe separation`: per-language separation of toxic vs benign hidden states in a base model and its
    aligned counterpart(s), per layer, with the alignment shift and the detox displacement (docs/separation.md).

    One family: ``base`` (+ ``aligned``). Several (the paper's setting): ``pairs``, a list of {base, aligned}."""

    base: ModelSpec | None = None
    aligned: list[ModelSpec] = Field(
        default_factory=list,
        description="aligned counterparts of `base` (hub ids, local dirs, training outputs); empty: base-only analysis",
    )
    pairs: list[ModelFamily] = Field(
        default_factory=list, description="several base/aligned families in one run, instead of base/aligned"
    )
    safety: SourceSpec = Field(
        default_factory=lambda: SourceSpec(kind="fixture", name="safety_prompts"),
        description="toxic / benign texts with a 0/1 `label` (prompt-variants contract)",
    )
    detox: SourceSpec | None = Field(
        default_factory=lambda: SourceSpec(kind="fixture", name="detox_pairs"),
        description="parallel toxic / neutral pairs (parallel-detox contract); null: no detox analysis",
    )
    activations_dir: str = Field(
        "outputs/activations/separation",
        description="activation stores: <dir>/safety and <dir>/detox (extracted there when missing)",
    )
    safety_activations: str | None = Field(
        None, description="store of the safety set (default <activations_dir>/safety)"
    )
    detox_activations: str | None = Field(
        None, description="store of the detox pairs (default <activations_dir>/detox)"
    )
    extract_if_missing: bool = Field(True, description="run the extraction flow for missing activations (else fail)")
    output_dir: str = "outputs/separation"
    layers: list[int] | Literal["all"] = Field("all", description="layers analysed; all: every extracted layer")
    position: Literal["last", "mean"] | None = Field(None, description="pooled position; default extract.positions[0]")
    english: str = Field("en", description="the reference language of the ratios and of the detox safety direction")
    scatter_layers: list[int] | Literal["best"] = Field(
        "best", description="layers of the PCA scatter plots; best: where the last model separates English most"
    )
    scatter_points_per_class: int = Field(300, ge=10, description="points per language and class in a scatter plot")
    options: SeparationOptions = SeparationOptions()
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads of the analysis (default: torch's, one per core); 1 is "
        "faster for small cells and on a busy machine (docs/separation.md, Cost)",
    )
    extract: ExtractSpec = ExtractSpec()
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("layers", "scatter_layers")
    @classmethod
    def _layers_ok(cls, v):
        if v not in ("all", "best"):
            if not v:
                raise ValueError("give at least one layer")
            bad = [x for x in v if x < 0]
            if bad:
                raise ValueError(f"layer indices are >= 0 (0 = embeddings); got {bad}")
            return sorted(set(v))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SeparationConfig":
        if self.base is None and not self.pairs:
            raise ValueError("give the base model (`base`, with optional `aligned`), or several families (`pairs`)")
        if self.base is not None and self.pairs:
            raise ValueError("give either `base` (+ `aligned`) or `pairs`, not both")
        if self.aligned and self.base is None:
            raise ValueError("`aligned` needs `base`; with `pairs`, list each family's aligned models inside it")
        labels = [m.label for m in self.models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(
                f"model labels must be unique across base and aligned, {dup} repeats: set `name` on each model"
            )
        if self.position is not None and self.position not in self.extract.positions:
            raise ValueError(
                f"position {self.position!r} is not extracted (extract.positions = "
                f"{self.extract.positions}): add it there"
            )
        if self.layers != "all" and self.extract.layers != "all":
            missing = sorted(set(self.layers) - set(self.extract.layers))
            if missing:
                raise ValueError(
                    f"layers {missing} are analysed but not extracted (extract.layers = "
                    f"{self.extract.layers}): add them there, or set extract.layers: all"
                )
        return self

    @property
    def families(self) -> list[ModelFamily]:
        """The base/aligned families analysed (one unless ``pairs`` is used)."""
        if self.base is not None:
            return [ModelFamily(base=self.base, aligned=self.aligned)]
        return list(self.pairs)

    @property
    def models(self) -> list[ModelSpec]:
        """Every model: each family's base, then its aligned models."""
        return [m for f in self.families for m in (f.base, *f.aligned)]

    @property
    def pooled_position(self) -> str:
        return self.position or self.extract.positions[0]

    def store_dir(self, which: Literal["safety", "detox"]) -> Path:
        own = self.safety_activations if which == "safety" else self.detox_activations
        return Path(own) if own else Path(self.activations_dir) / which
