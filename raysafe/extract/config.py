"""The extraction flow's typed config: which models, which texts, which layers and positions, how to batch and shard."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from raysafe.config import (
    ModelSpec,
    OutputDir,
    RaySpec,
    SourceSpec,
    Strict,
    TrackingSpec,
    require_models,
)


# -------------------------------------------------------------------------------------------------- extract
class ExtractSpec(Strict):
    layers: list[int] | Literal["all"] = "all"
    positions: list[Literal["last", "mean"]] = ["last"]
    store_dtype: Literal["float16", "float32"] = "float32"
    max_length: int = Field(512, ge=2, description="tokens per text after the chat template")
    on_overflow: Literal["truncate", "error"] = "truncate"
    truncate: Literal["head", "tail"] = Field(
        "head",
        description="which part of a text over max_length is kept: head = its first max_length tokens (the authors' "
        "code: Hugging Face truncation, LLaMA-Factory's cutoff_len); tail = a leading BOS and its last tokens",
    )
    chat_template: bool = Field(
        False,
        description="default for every model: wrap each text as a user turn with the tokenizer's own chat template "
        "and read the generation prompt's last token (per model: `templates`)",
    )
    templates: dict[str, str] = Field(
        default_factory=dict,
        description="per model label: 'tokenizer' (its tokenizer's chat template), 'none' (the raw text) or a format "
        "string with {text}, e.g. '[INST] {text} [/INST] ' for Llama-2-chat as Xu et al.; overrides chat_template",
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

    @field_validator("templates")
    @classmethod
    def _templates_ok(cls, v):
        bad = {k: t for k, t in v.items() if t not in ("tokenizer", "none") and "{text}" not in t}
        if bad:
            raise ValueError(
                f"templates {bad} are neither 'tokenizer', 'none' nor a format string with {{text}} "
                "(e.g. '[INST] {text} [/INST] ')"
            )
        return v

    def template_for(self, model: str) -> str:
        """The template applied to ``model``'s texts: ``templates[model]`` if given, else ``tokenizer`` when
        ``chat_template`` is on, else ``none``."""
        return self.templates.get(model, "tokenizer" if self.chat_template else "none")

    def template_identity(self, model: str) -> bool | str:
        """What the activation store records as ``chat_template`` for ``model``: False (raw text), True (the
        tokenizer's template) or the format string."""
        t = self.template_for(model)
        return {"none": False, "tokenizer": True}.get(t, t)

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
        return require_models(v)

    @model_validator(mode="after")
    def _templates_name_models(self) -> "ExtractConfig":
        unknown = sorted(set(self.extract.templates) - {m.label for m in self.models})
        if unknown:
            raise ValueError(f"extract.templates names models {unknown} that are not in `models`")
        return self
