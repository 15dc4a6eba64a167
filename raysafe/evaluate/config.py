"""Typed settings of the evaluation flow (generation, judges, evaluation sets, utility, metrics).

They live here rather than in ``raysafe.config`` so that the Ray actors of this flow import them without the
flow module; :class:`raysafe.evaluate.flow.EvaluateConfig` assembles them.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from raysafe.config import (
    ModelSpec,
    OutputDir,
    RaySpec,
    SourceSpec,
    Strict,
    TrackingSpec,
    require_unique,
)
from raysafe.data.languages import is_known

FIXTURE_LANGUAGES = ["en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku"]


def safe_label(text: str) -> str:
    """A label usable as a directory name and an MLflow key fragment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


class VllmSpec(Strict):
    """Engine settings of the ``vllm`` generation backend (read only when ``generation.backend`` is ``vllm``)."""

    tensor_parallel_size: int | None = Field(
        None, ge=1, description="GPUs one engine spans; None: int(ray.num_gpus_per_actor), at least 1"
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of GPU memory vLLM reserves for weights and KV cache (the CPU build: share of host RAM "
        "for the KV cache; use about 0.2 on a shared machine)",
    )
    max_model_len: int | None = Field(
        None, ge=8, description="context length of the engine; None: max_prompt_tokens + max_new_tokens"
    )
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of shared prefixes (the chat template)")
    enforce_eager: bool = Field(False, description="no CUDA graph capture: faster start, slower decoding")
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences decoded together (continuous batching); None: vLLM's default"
    )
    batch_size: int = Field(64, ge=1, description="prompts per Ray Data batch sent to an engine")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="further vLLM engine arguments (e.g. quantization, kv_cache_dtype)"
    )


class GenerationSpec(Strict):
    """How responses are generated (greedy unless ``temperature`` > 0) and by which backend."""

    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: Hugging Face generate in a Ray Data actor pool (the reference, CPU default); vllm: vLLM "
        "engines through Ray Data LLM (needs the vllm extra: pip install -e '.[vllm]')",
    )
    vllm: VllmSpec = VllmSpec()
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="sampling seed (per shard and batch; irrelevant for greedy decoding)")
    stop_strings: list[str] = Field(default_factory=list, description="cut the response at the first of these")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: wrap the prompt as a user turn when the tokenizer has a chat template"
    )
    system_prompt: str | None = Field(None, description="system turn (chat template only)")
    plain_format: str = Field("{prompt}", description="prompt text without a chat template; must contain {prompt}")
    max_prompt_tokens: int = Field(1024, ge=4, description="longer prompts keep their last tokens (and BOS)")
    batch_size: int = Field(16, ge=1, description="hf: prompts per generate call (length-sorted)")
    shard_rows: int = Field(64, ge=1, description="prompts per output shard: the unit of atomic writes and resume")

    @field_validator("plain_format")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("plain_format must contain the placeholder {prompt}")
        return v

    @field_validator("stop_strings")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    def identity(self) -> dict:
        """The fields that decide the generations of this backend (the identity of stored generations): ``hf``
        leaves out the vllm section (and the backend name, so generations stored before backends existed stay
        valid); ``vllm`` leaves out hf's ``batch_size``."""
        exclude = {"backend", "vllm"} if self.backend == "hf" else {"batch_size"}
        return self.model_dump(mode="json", exclude=exclude)


def is_loopback_host(host: str) -> bool:
    """``localhost``, an address in 127.0.0.0/8, or ``::1`` (by name or literal only: nothing is resolved)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_url_problem(url: str) -> str | None:
    """Why ``url`` may not carry an openai judge's requests, or None when it may: it must be ``https://``, or
    ``http://`` to a loopback host (prompts, responses and the API key travel in it), and hold no credentials."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError as e:
        return f"{url!r} is not a URL ({e})"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{url!r} is not an https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "the URL carries credentials (user:password@), which would be sent and logged with it"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return (
            f"plain http to {parts.hostname!r} would send the prompts, the responses and the API key unencrypted; "
            "use https (http is accepted only for loopback: localhost, 127.0.0.0/8, ::1)"
        )
    return None


class JudgeSpec(Strict):
    """One judge of (prompt, response) pairs.

    kind:
      - ``offline``: multilingual refusal / compliance patterns (+ reference answers when given); no model, no hub.
      - ``classifier``: a Llama-Guard-style causal LM (hub id or path) prompted with its chat template over the
        (user prompt, assistant response) conversation; its generated text must start with ``safe`` or ``unsafe``.
      - ``openai``: an OpenAI-compatible ``/chat/completions`` endpoint; the base URL is ``url`` or the environment
        variable named by ``url_env`` (https, or http to a loopback host only), the key the variable named by
        ``key_env``.
    """

    kind: Literal["offline", "classifier", "openai"] = "offline"
    name: str | None = Field(None, description="label in outputs (default: from the kind and model)")
    # offline
    use_references: bool = Field(True, description="offline: decide by a near-copy of a reference answer when given")
    reference_threshold: float = Field(0.6, gt=0, le=1, description="offline: char-3-gram containment for a match")
    # classifier
    model: ModelSpec | None = Field(None, description="classifier: the safety classifier model")
    prompt_format: str | None = Field(
        None,
        description="classifier/openai: the judge's input text with {prompt} and {response}; classifier: "
        "None uses the tokenizer's chat template over the conversation",
    )
    max_new_tokens: int = Field(12, ge=1, description="classifier/openai: tokens of verdict to read")
    batch_size: int = Field(8, ge=1)
    max_input_tokens: int = Field(4096, ge=16, description="classifier: longer inputs keep their last tokens")
    ray: RaySpec | None = Field(None, description="classifier: actor pool resources (default: the flow's `ray`)")
    # openai
    url: str | None = Field(
        None,
        description="openai: the endpoint's base URL (…/v1), https (http only for loopback); unset: read from url_env",
    )
    url_env: str = Field("RAYSAFE_JUDGE_URL", description="openai: env var holding the base URL (…/v1)")
    key_env: str = Field("RAYSAFE_JUDGE_API_KEY", description="openai: env var holding the API key (may be unset)")
    endpoint_model: str | None = Field(None, description="openai: the model name the endpoint serves")
    timeout_s: float = Field(60.0, gt=0, description="openai: seconds to connect, and between bytes of the reply")
    max_retries: int = Field(3, ge=0, description="openai: retries of a request after the first try")
    retry_backoff_s: float = Field(
        1.0,
        ge=0,
        description="openai: wait before the first retry, doubled each retry (at most 30 s; Retry-After wins)",
    )
    concurrency: int = Field(4, ge=1, description="openai: requests in flight")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        problem = endpoint_url_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _check_kind(self) -> "JudgeSpec":
        if self.kind == "classifier" and self.model is None:
            raise ValueError("a classifier judge needs `model` (hub id or path of e.g. meta-llama/Llama-Guard-3-8B)")
        if self.kind == "openai" and not self.endpoint_model:
            raise ValueError("an openai judge needs `endpoint_model` (the model name the endpoint serves)")
        if self.prompt_format is not None and (
            "{prompt}" not in self.prompt_format or "{response}" not in self.prompt_format
        ):
            raise ValueError("prompt_format must contain {prompt} and {response}")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return safe_label(self.name)
        if self.kind == "classifier":
            return safe_label(f"classifier-{self.model.label}")
        if self.kind == "openai":
            return safe_label(f"openai-{self.endpoint_model}")
        return "offline"


class EvalSetSpec(Strict):
    """One evaluation set: prompt variants from one or more sources, with the metric reported for it."""

    name: str
    sources: list[SourceSpec]
    metric: Literal["safety_rate", "attack_success_rate"] = Field(
        "safety_rate", description="attack_success_rate (= 1 - safety rate) for jailbreak sets"
    )
    split: str | None = Field(None, description="keep rows of this split (sources without a split column: all rows)")
    harmful_only: bool = Field(
        True,
        description="keep only harmful prompts (label 1; unlabelled rows count as harmful); false also "
        "generates for harmless prompts (label 0) and reports the over-refusal rate on them",
    )
    references: SourceSpec | None = Field(
        None,
        description="reference answers (preference-pair contract: chosen = safe, rejected = unsafe) joined "
        "by group_id (and lang, or reference_lang when they have none); used by the offline judge",
    )
    reference_lang: str = "en"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if safe_label(v) != v:
            raise ValueError(
                f"set names are used in paths: use letters, digits, '.', '_' or '-' (e.g. {safe_label(v)!r})"
            )
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("give at least one source")
        return v


MC_PROMPT = "Question: {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"


class UtilitySpec(Strict):
    """Multiple-choice accuracy by log-likelihood (MMLU-style), per language."""

    enabled: bool = True
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="fixture", name="mc_questions")])
    scoring: Literal["letter", "option"] = Field(
        "letter",
        description="letter: log-prob of ' A'..' D' after the prompt; option: mean log-prob per token "
        "of each option's text",
    )
    prompt_format: str = Field(MC_PROMPT, description="fields {question} {A} {B} {C} {D}")
    split: str | None = Field(None, description="keep rows of this split when the source has one")
    max_length: int = Field(1024, ge=8, description="context tokens (longer: keep the last ones)")
    batch_size: int = Field(16, ge=1)
    shard_rows: int = Field(256, ge=1)

    @field_validator("prompt_format")
    @classmethod
    def _fields(cls, v: str) -> str:
        missing = [f for f in ("{question}", "{A}", "{B}", "{C}", "{D}") if f not in v]
        if missing:
            raise ValueError(f"prompt_format lacks {missing}")
        return v


class MetricsSpec(Strict):
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of prompt groups (0: no intervals)")
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    variance_ddof: Literal[0, 1] = Field(0, description="0: population variance across languages; 1: sample")


def _default_sets() -> list[EvalSetSpec]:
    return [
        EvalSetSpec(name="safety_prompts", sources=[SourceSpec(kind="fixture", name="safety_prompts")], split="test")
    ]


def model_label(spec: ModelSpec) -> str:
    """Directory-safe label: ``name``, else the path's last part; a training checkpoint's ``.../<run>/<ckpt>/model``
    becomes ``<run>-<ckpt>`` so that several checkpoints do not all read ``model``."""
    if spec.name:
        return safe_label(spec.name)
    p = Path(spec.path.rstrip("/"))
    if p.name == "model" and p.parent.name:
        parts = [p.parent.parent.name, p.parent.name] if p.parent.name.startswith("checkpoint") else [p.parent.name]
        return safe_label("-".join(x for x in parts if x))
    return safe_label(spec.label)


class EvaluateConfig(Strict):
    """`raysafe evaluate`: generate responses per language, judge them, and report multilingual safety metrics."""

    models: list[ModelSpec] = Field(
        description="models to evaluate: 'gemma3-270m', a hub id, a local HF directory "
        "(e.g. a training checkpoint's .../model) or a .gguf file"
    )
    sets: list[EvalSetSpec] = Field(default_factory=_default_sets)
    languages: list[str] | None = Field(
        None,
        description="evaluate these languages (listed ones without prompts appear in the tables with 0 "
        "prompts); None: every language of the sets",
    )
    generation: GenerationSpec = GenerationSpec()
    judges: list[JudgeSpec] = Field(default_factory=lambda: [JudgeSpec(kind="offline")])
    utility: UtilitySpec = UtilitySpec()
    metrics: MetricsSpec = MetricsSpec()
    output_dir: OutputDir = Field("outputs/evaluate", validate_default=True)
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        if not v:
            raise ValueError("give at least one model")
        require_unique([model_label(m) for m in v], "model")
        return v

    @field_validator("judges")
    @classmethod
    def _judges(cls, v: list[JudgeSpec]) -> list[JudgeSpec]:
        if not v:
            raise ValueError("give at least one judge (kind: offline needs no model)")
        require_unique([j.label for j in v], "judge")
        return v

    @field_validator("languages")
    @classmethod
    def _languages(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            bad = [x for x in v if not is_known(x)]
            if bad:
                raise ValueError(f"unknown language code(s) {bad}; use ISO 639-1 (or RAYSAFE_EXTRA_LANGS)")
            if not v:
                raise ValueError("give at least one language, or leave `languages` unset")
        return v
