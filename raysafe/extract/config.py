"""The extraction flow's typed config: which models, which texts, which layers and positions, how to batch and shard."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
)

from raysafe.config import (
    ModelSpec,
    OutputDir,
    RaySpec,
    SourceSpec,
    Strict,
    TrackingSpec,
    require_unique,
)


# -------------------------------------------------------------------------------------------------- extract
class ExtractSpec(Strict):
    layers: list[int] | Literal["all"] = "all"
    positions: list[Literal["last", "mean"]] = ["last"]
    store_dtype: Literal["float16", "float32"] = "float32"
    max_length: int = Field(512, ge=2, description="tokens per text after the chat template")
    on_overflow: Literal["truncate", "error"] = "truncate"
    chat_template: bool = Field(
        False, description="wrap each text as a user turn and read the generation prompt's last token"
    )
    padding_side: Literal["right", "left"] = "right"
    max_tokens_per_batch: int = Field(8192, ge=16, description="token budget of one padded batch (rows x longest)")
    max_rows_per_batch: int = Field(256, ge=1)
    batch_overhead_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="cost of one more forward call, in tokens: the batch planner minimises padded tokens + "
        "this x batches; auto = 32 on CPU (a forward costs little beyond its tokens), 256 on GPU (launch overhead)",
    )
    shard_rows: int = Field(512, ge=1, description="rows per output shard: the unit of atomic writes and resume")

    @field_validator("layers")
    @classmethod
    def _layers_nonneg(cls, v):
        if v != "all":
            if not v:
                raise ValueError("give at least one layer, or 'all'")
            bad = [x for x in v if x < 0]
            if bad:
                raise ValueError(f"layer indices are >= 0 (0 = embeddings, L = output of decoder layer L); got {bad}")
        return v

    @field_validator("positions")
    @classmethod
    def _positions_nonempty(cls, v):
        if not v:
            raise ValueError("give at least one position: last, mean")
        return list(dict.fromkeys(v))


class ExtractConfig(Strict):
    """`raysafe extract`: stream text rows through a model actor pool and write pooled hidden states."""

    models: list[ModelSpec]
    data: SourceSpec
    output_dir: OutputDir = Field("outputs/activations", validate_default=True)
    extract: ExtractSpec = ExtractSpec()
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v):
        if not v:
            raise ValueError("give at least one model")
        require_unique([m.label for m in v], "model")
        return v
