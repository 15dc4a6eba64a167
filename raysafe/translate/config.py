"""The translation flow's typed config: which rows, which translator, which languages, which quality checks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raysafe.config import ModelSpec, RaySpec, SourceSpec, Strict, TrackingSpec
from raysafe.data.languages import is_known

DEFAULT_PROMPT = (
    "Translate the following text from {source_name} into {target_name}. Keep its meaning, tone and format; do not "
    "answer it, add notes or explanations. Reply with the translation only.\n\n{text}"
)


class TranslatorSpec(Strict):
    """Who translates.

    kind:
      - ``seq2seq``: a Hugging Face sequence-to-sequence MT model on the actor pool (NLLB-200, M2M100, Marian).
        ``model`` serves every direction (NLLB, M2M100, a multi-target Marian such as opus-mt-en-mul); ``directions``
        names a model per direction ``"<src>-<tgt>"`` (bilingual Marian models: en-zh forward, zh-en for the
        round trip) and wins over ``model``.
      - ``llm``: an instruction-tuned causal LM prompted with ``prompt_format`` (the evaluation's generation
        backend; ``backend: hf``; ``vllm`` is not available yet).
      - ``openai``: an OpenAI-compatible ``/chat/completions`` endpoint (URL and key from the environment variables
        named by ``url_env`` / ``key_env``); https only, except on the loopback interface.
    """

    kind: Literal["seq2seq", "llm", "openai"] = "seq2seq"
    name: str | None = Field(None, description="label in outputs (default: from the kind and model)")
    model: ModelSpec | None = None
    directions: dict[str, ModelSpec] = Field(
        default_factory=dict, description='seq2seq: one model per direction, keyed "<src>-<tgt>" (e.g. "en-zh")'
    )
    family: Literal["auto", "nllb", "m2m100", "marian"] = Field(
        "auto", description="seq2seq: how language codes are written (auto: from the tokenizer's vocabulary)"
    )
    lang_codes: dict[str, str] = Field(
        default_factory=dict,
        description="raysafe language code -> the model's own code (zh -> zho_Hant for traditional script), "
        "overriding the built-in tables",
    )
    num_beams: int = Field(1, ge=1, description="seq2seq: beam search width (1 = greedy; the llm decodes greedily)")
    max_new_tokens: int = Field(256, ge=1, description="tokens per translated text")
    max_input_tokens: int = Field(512, ge=8, description="longer inputs are refused with the row named")
    batch_size: int = Field(16, ge=1, description="texts per generate call (length-sorted)")
    # llm
    backend: Literal["hf", "vllm"] = Field("hf", description="llm: generation backend")
    prompt_format: str = Field(
        DEFAULT_PROMPT, description="llm/openai: the request, with {text}, {source_name}, {target_name}"
    )
    chat_template: Literal["auto", "on", "off"] = Field("auto", description="llm: wrap the request as a user turn")
    stop_strings: list[str] = Field(
        default_factory=list, description="llm: cut the output at the first of these (e.g. a newline for base models)"
    )
    # openai
    url_env: str = Field("RAYSAFE_TRANSLATE_URL", description="openai: env var holding the base URL (…/v1)")
    key_env: str = Field("RAYSAFE_TRANSLATE_API_KEY", description="openai: env var holding the API key (may be unset)")
    endpoint_model: str | None = Field(None, description="openai: the model name the endpoint serves")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    concurrency: int = Field(4, ge=1, description="openai: requests in flight per actor")

    @model_validator(mode="after")
    def _check_kind(self) -> "TranslatorSpec":
        if self.kind in ("seq2seq", "llm") and self.model is None and not self.directions:
            raise ValueError(f"a {self.kind} translator needs `model` (hub id or path)")
        if self.kind != "seq2seq" and self.directions:
            raise ValueError("`directions` applies to seq2seq translators only")
        if self.kind == "openai" and not self.endpoint_model:
            raise ValueError("an openai translator needs `endpoint_model` (the model name the endpoint serves)")
        if "{text}" not in self.prompt_format:
            raise ValueError("prompt_format must contain {text}")
        for key in self.directions:
            parts = key.split("-")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f'directions key {key!r} must be "<src>-<tgt>", e.g. "en-zh"')
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "openai":
            return f"openai-{self.endpoint_model}"
        if self.model is not None:
            return self.model.label
        return "directions"


class QualitySpec(Strict):
    """Per-row checks. Scores are stored beside each translation; thresholds turn them into flags when the outputs
    are assembled (changing a threshold re-flags without re-translating)."""

    langid: str = Field(
        "langid",
        description="language identifier of the output: 'langid' (langid.py, 97 languages, model shipped in the "
        "package), 'off', or 'module:function' returning (lang, probability) per text",
    )
    min_langid_prob: float = Field(
        0.5, ge=0, le=1, description="flag when the identified language differs, or its probability is below this"
    )
    langid_accept: dict[str, list[str]] = Field(
        default_factory=dict,
        description="more identifier answers to accept for a target language, e.g. {ps: [fa]}: langid.py reads "
        "17 % of the bundled Pashto prompts as Persian (docs/translate.md)",
    )
    round_trip: bool = Field(True, description="back-translate every output and score it against the source (chrF)")
    min_chrf: float = Field(20.0, ge=0, le=100, description="flag when the round-trip chrF is below this")
    min_length_ratio: float = Field(0.15, ge=0, description="flag when len(output)/len(source) in characters is below")
    max_length_ratio: float = Field(4.0, gt=0, description="... or above this")
    max_unk_rate: float = Field(
        0.05, ge=0, le=1, description="flag rows (and warn per language) whose output has more unknown tokens"
    )
    exclude_flagged: bool = Field(
        True,
        description="leave flagged rows out of the contract files (they stay in "
        "translations.parquet and are counted per language in the report)",
    )

    @field_validator("langid")
    @classmethod
    def _langid(cls, v: str) -> str:
        if v not in ("langid", "off") and ":" not in v:
            raise ValueError("use 'langid', 'off' or 'module:function'")
        return v


class TranslateSpec(Strict):
    contract: Literal["auto", "prompt_variants", "preference_pairs"] = Field(
        "auto",
        description="what the source holds: prompt variants (text per row) or preference pairs (prompt, chosen, "
        "rejected, each translated separately); auto: preference_pairs for that fixture, else prompt_variants",
    )
    source_lang: str = Field("en", description="rows in this language are translated (pairs without lang: all)")
    target_langs: list[str]
    shard_rows: int = Field(64, ge=1, description="source rows per shard and language: the unit of writes and resume")

    @field_validator("source_lang")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if not is_known(v):
            raise ValueError(f"unknown language code {v!r} (ISO 639-1, or list it in RAYSAFE_EXTRA_LANGS)")
        return v

    @field_validator("target_langs")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one target language")
        bad = [x for x in v if not is_known(x)]
        if bad:
            raise ValueError(f"unknown language code(s) {bad} (ISO 639-1, or list them in RAYSAFE_EXTRA_LANGS)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _source_not_target(self) -> "TranslateSpec":
        if self.source_lang in self.target_langs:
            raise ValueError(f"target_langs contains the source language {self.source_lang!r}")
        return self


class TranslateConfig(Strict):
    """`raysafe translate`: turn a prompt or preference set into checked variants in N languages."""

    data: SourceSpec
    translator: TranslatorSpec
    translate: TranslateSpec
    quality: QualitySpec = QualitySpec()
    output_dir: str = "outputs/translate"
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()
