"""Typed configurations: YAML in, ``--set a.b=c`` overrides, errors that name the field, the value and what is allowed.

Each flow has one top-level config model (``ExtractConfig``, ...). Sub-configs shared by flows (models, data
sources, Ray resources, tracking) live here too. ``load_config(ExtractConfig, "jobs/configs/extract_local.yaml",
["ray.num_actors=2"])`` returns a validated instance or raises :class:`raysafe.errors.ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from raysafe.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- models
class ModelSpec(Strict):
    """One causal LM. ``path`` is the packaged demo alias ``gemma3-270m``, a hub id, a local directory or a .gguf file."""

    name: str | None = Field(None, description="label used in outputs; defaults to the last path component")
    path: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.path.rstrip("/")).name.removesuffix(".gguf") or self.path


# ----------------------------------------------------------------------------------------------------- data
class SourceSpec(Strict):
    """Where rows come from.

    kind:
      - ``fixture``: a set bundled with the package (``name``: safety_prompts, detox_pairs, concept_pairs,
        preference_pairs, judge_labelled);
      - ``file``: local Parquet / JSONL / CSV (``path``; a directory of Parquet files works too);
      - ``hub``: a Hugging Face dataset by id (``path``), with ``subset``/``split``, or one subset per language
        (``subsets_by_lang``) or one split per language (``splits_by_lang``).
    ``columns`` maps the source's column names to the contract's (``{"sentence": "text"}``); ``lang`` sets a constant
    language when the source has no language column; ``label_map`` maps raw label values to ints.
    """

    kind: Literal["fixture", "file", "hub"] = "fixture"
    contract: Literal["auto", "prompt_variants", "parallel_detox", "concept_pairs"] = Field(
        "auto", description="row contract of the source; auto: from the fixture name, else prompt_variants"
    )
    name: str | None = None
    path: str | None = None
    subset: str | None = None
    split: str | None = None
    subsets_by_lang: dict[str, str] | None = None
    splits_by_lang: dict[str, str] | None = Field(None, description="hub sets that keep one split per language")
    columns: dict[str, str] = Field(default_factory=dict)
    lang: str | None = None
    label_map: dict[str, int] | None = None
    languages: list[str] | None = Field(None, description="keep only these languages")
    limit_per_lang: int | None = Field(
        None,
        gt=0,
        description="keep at most this many rows per language (the first rows when the source has no language column)",
    )
    items_per_class: int | None = Field(
        None,
        gt=0,
        description="keep the first N items (group_ids) of every class — each (label or concept, split) "
        "combination the source has — in every language: a smaller set with the classes balanced and the items "
        "still parallel across languages (limit_per_lang keeps the first rows, whatever their class)",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> "SourceSpec":
        if self.kind == "fixture" and not self.name:
            raise ValueError("a fixture source needs `name` (safety_prompts, detox_pairs, concept_pairs, ...)")
        if self.kind in ("file", "hub") and not self.path:
            raise ValueError(f"a {self.kind} source needs `path`")
        return self


def require_unique(labels: list[str], what: str, scope: str = "") -> None:
    """Raise ValueError naming the repeated labels: outputs are keyed by label, so two models (or judges) with one
    label would overwrite each other."""
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"{what} labels must be unique{scope}, {dup} repeats: set `name` on each {what}")


# ------------------------------------------------------------------------------------------------------ ray
class RaySpec(Strict):
    """Ray resources. ``address`` None: use RAY_ADDRESS if set, else start a local instance."""

    address: str | None = None
    num_actors: int = Field(1, ge=1, description="size of the model actor pool")
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per actor (default: CPUs/actors)")
    tokenize_cpus: float = Field(0.5, gt=0, description="CPUs per tokenisation task")
    omp_wait_policy: Literal["passive", "active", "inherit"] = Field(
        "passive",
        description="OMP_WAIT_POLICY of the model actors: passive threads sleep between parallel regions, so Ray's "
        "own processes run in those gaps instead of preempting a compute thread (+9 % on 2 cores); inherit: leave "
        "the environment alone",
    )


class TrackingSpec(Strict):
    """MLflow. ``tracking_uri`` None: MLFLOW_TRACKING_URI if set, else a SQLite store ``mlflow.db`` in the cwd."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "raysafe"
    run_name: str | None = None
    fallback_to_local: bool = Field(
        False, description="if the tracking server is unreachable, log to the local SQLite store instead of failing"
    )
    log_system_metrics: bool = Field(
        False,
        description="sample CPU, memory, disk, network and GPU use into the run (system/* metrics, every 10 s): "
        "in the flow's own process and on training's rank-0 worker",
    )


# --------------------------------------------------------------------------------------------- load/merge
def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b]… = value`` in place for ``dotted`` = ``"a.b…"``: missing (or null) mappings on the way are
    created, list items are addressed by index. The one dotted-key setter (``--set`` overrides, sweep trials).

    Raises ``ValueError`` naming the path when it runs through something that is neither a mapping nor a list, or
    past the end of a list.
    """
    keys = dotted.split(".")
    node: Any = tree
    try:
        for k in keys[:-1]:
            if isinstance(node, list):
                node = node[int(k)]
                continue
            if not isinstance(node, dict):
                raise ValueError(f"cannot set {dotted!r}: the value above {k!r} is not a mapping")
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ValueError(f"cannot set {dotted!r}: the value above {last!r} is not a mapping")
    except IndexError:
        raise ValueError(f"cannot set {dotted!r}: a list index is past the end of its list") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → ("a.b", c) with c parsed as YAML (numbers, booleans, lists ``[1,2]``, null)."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '='",
            where="--set",
            fix="write overrides as key.path=value, e.g. ray.num_actors=2",
        )
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_validation_error(err: ValidationError, cls: type[BaseModel], source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        value = e.get("input")
        msg = e["msg"]
        allowed = ""
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            allowed = f" (allowed: {ctx['expected']})"
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if not loc:  # a check across fields (model validator): its message says where
            lines.append(f"- {msg.removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"- {loc}: unknown field (value {shown}); check its spelling against `raysafe {cls.__name__}`")
        elif e["type"] == "missing":
            lines.append(f"- {loc}: required field is missing")
        else:
            lines.append(f"- {loc} = {shown}: {msg}{allowed}")
    return ConfigError(
        f"invalid {cls.__name__}:\n" + "\n".join(lines),
        where=source,
        fix="correct the field(s) above in the YAML file or the --set override",
    )


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> T:
    """Read YAML ``path`` (or ``data``), apply ``key=value`` overrides, validate into ``cls``."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist",
                where=str(p),
                fix="pass the path of a YAML config, e.g. jobs/configs/extract_local.yaml",
            )
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file is not valid YAML: {e}", where=str(p), fix="fix the YAML syntax") from None
        if not isinstance(tree, dict):
            raise ConfigError("config file must hold a mapping at the top level", where=str(p))
    if data:
        tree = {**tree, **data}
    for ov in overrides or []:
        key, value = parse_override(ov)
        try:
            set_path(tree, key, value)
        except ValueError:
            raise ConfigError(
                f"cannot apply override {ov!r}", where="--set", fix="check the key path against the config"
            ) from None
        source = f"{source} with --set {' '.join(overrides or [])}"
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise _format_validation_error(e, cls, source) from None


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML (what was actually run), for logs and MLflow."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def on_off(v):
    """YAML 1.1 reads unquoted on/off as booleans; accept them for the on/off/auto switches."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
