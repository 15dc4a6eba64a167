"""The value-concepts flow's typed config: models, concept pairs, analysis options, steering."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raysafe.concepts.language_distance import DEFAULT_DISTANCE_TYPES
from raysafe.concepts.steering import (
    ConceptSteeringSpec,
)
from raysafe.concepts.tables import (
    DEFAULT_HIGH_RESOURCE,
    ConceptOptions,
)
from raysafe.config import (
    ModelSpec,
    RaySpec,
    SourceSpec,
    Strict,
    TrackingSpec,
    require_models,
)
from raysafe.extract.config import ExtractSpec

DistanceType = Literal["genetic", "geographic", "syntactic", "phonological", "inventory", "featural"]


class ConceptAnalysisSpec(Strict):
    """Options of the concept analysis (docs/concepts.md).

    ``high_resource`` is the default set of high-resource languages (every other language counts as low-resource);
    ``high_resource_by_model`` overrides it per model label. The default set is the languages with the most web
    text and instruction data: en zh es fr de ja ru pt it ar ko.
    """

    method: Literal["mean_diff", "pca", "logistic"] = Field(
        "mean_diff",
        description="mean_diff: difference of class means (the paper); pca: first PC of pair "
        "differences (RepE); logistic: L2 logistic-probe weights",
    )
    min_pairs: int = Field(8, ge=1, description="least pairs a (concept, language) needs in each of train and test")
    selection_folds: int = Field(5, ge=2, description="folds of the train-only cross-validation that picks layers")
    distance_types: list[DistanceType] = Field(list(DEFAULT_DISTANCE_TYPES), min_length=1)
    iso3_overrides: dict[str, str] = Field(
        default_factory=dict, description="ISO 639-3 code per language code for URIEL, e.g. {zh: cmn} (sw → swh)"
    )
    distance_source: Literal["auto", "lang2vec", "uriel_features"] = Field(
        "auto",
        description="lang2vec: its precomputed distance() values (the paper); uriel_features: re-derived from URIEL "
        "features (every language); auto: lang2vec when it covers all languages, else uriel_features",
    )
    similarity_summary: Literal["max_over_layers", "best_layer"] = Field(
        "max_over_layers", description="which similarity per language pair enters the distance correlation"
    )
    high_resource: list[str] = Field(list(DEFAULT_HIGH_RESOURCE))
    high_resource_by_model: dict[str, list[str]] = Field(default_factory=dict)
    exclude_by_model: dict[str, list[str]] = Field(
        default_factory=dict, description="languages left out of the analysis of a model (by model label)"
    )
    logistic_C: float = Field(1.0, gt=0)
    seed: int = 0

    def options(self, num_layers: int) -> ConceptOptions:
        return ConceptOptions(
            method=self.method,
            min_pairs=self.min_pairs,
            selection_folds=self.selection_folds,
            high_resource=tuple(self.high_resource),
            high_resource_by_model={k: tuple(v) for k, v in self.high_resource_by_model.items()},
            exclude_by_model={k: tuple(v) for k, v in self.exclude_by_model.items()},
            distance_types=tuple(self.distance_types),
            iso3_overrides=dict(self.iso3_overrides),
            distance_source=self.distance_source,
            similarity_summary=self.similarity_summary,
            num_layers=num_layers,
            keep_vectors=True,
            logistic_C=self.logistic_C,
            seed=self.seed,
        )


class ConceptsConfig(Strict):
    """`raysafe concepts`: multilingual value concepts — recognition, consistency, distance, transfer, control."""

    models: list[ModelSpec]
    data: SourceSpec = Field(
        SourceSpec(kind="fixture", name="concept_pairs"),
        description="concept pairs: group_id, concept, lang, positive, negative, split",
    )
    activations_dir: str = Field(
        "outputs/activations/concept_pairs",
        description="activation store: reused when complete, extracted into otherwise",
    )
    output_dir: str = "outputs/concepts"
    layers: list[int] | Literal["all"] = Field(
        "all",
        description="layers to analyse (0 = embeddings, L = output of decoder layer L, the last one after "
        "the final norm); layers out of range are reported and skipped",
    )
    position: Literal["last", "mean"] = Field("last", description="pooled position to analyse (the paper: last)")
    extract: ExtractSpec = Field(
        ExtractSpec(), description="extraction settings; its layers/positions come from `layers` and `position`"
    )
    analysis: ConceptAnalysisSpec = ConceptAnalysisSpec()
    steering: ConceptSteeringSpec = ConceptSteeringSpec()
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v):
        return require_models(v)

    @field_validator("layers")
    @classmethod
    def _layers_nonempty(cls, v):
        if v != "all" and not v:
            raise ValueError("give at least one layer, or 'all'")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ConceptsConfig":
        if self.data.contract not in ("auto", "concept_pairs"):
            raise ValueError(f"data.contract must be concept_pairs (or auto), not {self.data.contract!r}")
        if self.data.kind == "fixture" and self.data.name != "concept_pairs":
            raise ValueError(
                f"the concept flow reads concept pairs; fixture {self.data.name!r} holds none "
                "(use name: concept_pairs, or a file/hub source with the concept-pairs columns)"
            )
        labels = {m.label for m in self.models}
        for field_name in ("high_resource_by_model", "exclude_by_model"):
            unknown = sorted(set(getattr(self.analysis, field_name)) - labels)
            if unknown:
                raise ValueError(
                    f"analysis.{field_name} names models {unknown} that are not in `models` ({sorted(labels)})"
                )
        unknown = sorted(set(self.extract.templates) - labels)
        if unknown:
            raise ValueError(f"extract.templates names models {unknown} that are not in `models` ({sorted(labels)})")
        if self.extract.layers != "all" or self.extract.positions != ["last"]:
            raise ValueError(
                "set the layers with the top-level `layers` and the position with `position`; "
                "extract.layers / extract.positions are derived from them"
            )
        return self
