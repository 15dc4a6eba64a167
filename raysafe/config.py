"""Typed configurations: YAML in, ``--set a.b=c`` overrides, errors that name the field, the value and what is allowed.

Each flow has one top-level config model (``ExtractConfig``, ...). Sub-configs shared by flows (models, data
sources, Ray resources, tracking) live here too. ``load_config(ExtractConfig, "jobs/configs/extract_local.yaml",
["ray.num_actors=2"])`` returns a validated instance or raises :class:`raysafe.errors.ConfigError`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raysafe.data.adapters import ADAPTER_NAMES
from raysafe.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


#: Model paths that name the packaged demo model rather than a file or a hub id.
DEMO_ALIASES = {"gemma3-270m", "gemma-3-270m", "demo"}

#: ``load_config`` validates with this context: local paths must then exist (programmatic configs, built for paths
#: that appear later, e.g. a training output, are only made absolute).
CHECK_PATHS = {"check_paths": True}


def is_local_path(path: str) -> bool:
    """A path on this machine rather than a hub id: starts with ./ ../ / ~ (or is . / ..), or exists here."""
    return path in (".", "..", "~") or path.startswith(("./", "../", "/", "~")) or Path(path).exists()


def absolute_path(path: str) -> str:
    """``path`` with ~ expanded, made absolute against the working directory and normalised (.. removed)."""
    return os.path.abspath(os.path.expanduser(path))


def local_path(value: str, info: ValidationInfo, what: str, always_local: bool = False) -> str:
    """``value`` made absolute if it is local (see :func:`is_local_path`; ``always_local``: whatever it looks like);
    under :data:`CHECK_PATHS` a local path that does not exist is a ValueError (pydantic names the field)."""
    if not (always_local or is_local_path(value)):
        return value
    full = absolute_path(value)
    if (info.context or {}).get("check_paths") and not os.path.exists(full):
        shown = repr(value) if full == value else f"{value!r} (resolved against {os.getcwd()} to {full})"
        hint = "give an existing file or directory" if always_local else "give an existing path, or a hub id (org/name)"
        raise ValueError(f"local {what} {shown} does not exist; {hint}")
    return full


#: An output directory written by Ray workers: made absolute on the driver (workers' working directories differ).
OutputDir = Annotated[str, AfterValidator(absolute_path)]


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

    @field_validator("path")
    @classmethod
    def _local_path(cls, v: str, info: ValidationInfo) -> str:
        if v in DEMO_ALIASES:
            return v
        return local_path(v, info, "model path", always_local=v.endswith(".gguf"))

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
    ``adapter`` maps a published layout (PKU-SafeRLHF, MultiJail, MMMLU, the textdetox sets, the MLC release) to
    the contract and fills its hub defaults (raysafe.data.adapters; docs/data.md). ``columns`` maps the source's
    column names to the contract's (``{"sentence": "text"}``), after the adapter; ``lang`` sets a constant language
    when the source has no language column; ``label_map`` maps raw label values to ints.
    """

    kind: Literal["fixture", "file", "hub"] = "fixture"
    contract: Literal["auto", "prompt_variants", "parallel_detox", "concept_pairs"] = Field(
        "auto", description="row contract of the source; auto: from the fixture name, else prompt_variants"
    )
    name: str | None = None
    path: str | None = None
    adapter: Literal[ADAPTER_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="a published layout to map to the contract (see docs/data.md)"
    )
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

    @field_validator("path")
    @classmethod
    def _local_path(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        return local_path(v, info, "data path", always_local=info.data.get("kind") == "file")

    @model_validator(mode="after")
    def _check_kind(self) -> "SourceSpec":
        if self.kind == "fixture" and not self.name:
            raise ValueError("a fixture source needs `name` (safety_prompts, detox_pairs, concept_pairs, ...)")
        if self.kind in ("file", "hub") and not self.path:
            raise ValueError(f"a {self.kind} source needs `path`")
        hub_only = [k for k in ("subset", "split", "subsets_by_lang", "splits_by_lang") if getattr(self, k)]
        if self.kind != "hub" and hub_only:
            raise ValueError(
                f"data.{hub_only[0]} applies to hub sources only, this source is kind={self.kind!r}: "
                f"remove {hub_only[0]} or set kind: hub"
            )
        if self.kind == "fixture" and self.adapter:
            raise ValueError(
                f"data.adapter {self.adapter!r} maps a published layout, but bundled fixtures are already in the "
                "contract: remove data.adapter, or set kind: hub / file with the set's path"
            )
        if self.subsets_by_lang and self.splits_by_lang:
            raise ValueError("give data.subsets_by_lang or data.splits_by_lang, not both")
        if self.lang is not None and (self.subsets_by_lang or self.splits_by_lang):
            raise ValueError(
                "data.lang sets one language for every row, but subsets_by_lang / splits_by_lang already give "
                "each part its language: remove data.lang"
            )
        if self.languages is not None and self.lang is not None and self.lang not in self.languages:
            raise ValueError(
                f"data.languages {self.languages} excludes data.lang {self.lang!r}, the language of every row: "
                "no row would be kept"
            )
        return self


def require_models(models: list) -> list:
    """A flow's ``models`` list: at least one, and unique labels (outputs are keyed by label)."""
    if not models:
        raise ValueError("give at least one model")
    require_unique([m.label for m in models], "model")
    return models


def require_unique(labels: list[str], what: str, scope: str = "") -> None:
    """Raise ValueError naming the repeated labels: outputs are keyed by label, so two models (or judges) with one
    label would overwrite each other."""
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"{what} labels must be unique{scope}, {dup} repeats: set `name` on each {what}")


# ------------------------------------------------------------------------------------------------------ ray
def _gpu_count(v: float) -> float:
    if v > 1 and v != int(v):
        raise ValueError(
            f"{v:g} GPUs per actor: above 1 give a whole number (the actor's model is spread over that many GPUs); "
            "below 1 a fraction lets actors share a GPU"
        )
    return v


#: GPUs reserved per model actor: a fraction below 1 (actors share a GPU) or a whole number; with N ≥ 2 the actor's
#: model is spread over its N GPUs (raysafe.models.placement).
GpuCount = Annotated[float, Field(ge=0), AfterValidator(_gpu_count)]


def capacity_field():
    """``ray.capacity`` of the train and sweep configs (see :func:`raysafe.runtime.capacity_from`)."""
    return Field(
        None,
        description="the most the cluster can grow to, e.g. {CPU: 64, GPU: 16}: work is sized and refused against it "
        "where the autoscaler reports no limits of its own (the cluster launcher's default autoscaler); nodes that are "
        "not up yet are left to Ray's autoscaler",
    )


class RaySpec(Strict):
    """Ray resources. ``address`` None: use RAY_ADDRESS if set, else start a local instance."""

    address: str | None = None
    num_actors: int = Field(1, ge=1, description="size of the model actor pool")
    num_gpus_per_actor: GpuCount = Field(
        0.0,
        description="GPUs per model actor: a fraction below 1 shares a GPU between actors; a whole number N ≥ 2 "
        "spreads one model over the actor's N GPUs (models that do not fit one)",
    )
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


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names allowed at ``loc``'s parent in ``cls`` (following sub-models, lists and dicts), if known."""
    model: Any = cls
    for key in loc[:-1]:
        if isinstance(key, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return None
        model = _model_in(field.annotation)
    return sorted(model.model_fields) if model is not None and hasattr(model, "model_fields") else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _override_of(loc: str, overrides: list[str]) -> str | None:
    """The --set override that wrote field ``loc`` (or a mapping above it), if any."""
    for ov in reversed(overrides):
        key = ov.split("=", 1)[0].strip()
        if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
            return ov
    return None


def _format_validation_error(
    err: ValidationError, cls: type[BaseModel], source: str, overrides: list[str] | None = None
) -> ConfigError:
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
        ov = _override_of(loc, overrides or []) if loc else None
        origin = f" [from --set {ov}]" if ov else ""
        if not loc:  # a check across fields (model validator): its message says where
            lines.append(f"- {msg.removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            names = _fields_at(cls, e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), names or [], n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            known = f" (fields here: {', '.join(names)})" if names else ""
            lines.append(f"- {loc}: unknown field (value {shown}){origin}{hint}{known}")
        elif e["type"] == "missing":
            lines.append(f"- {loc}: required field is missing")
        else:
            lines.append(f"- {loc} = {shown}{origin}: {msg}{allowed}")
    return ConfigError(
        f"invalid {cls.__name__}:\n" + "\n".join(lines),
        where=source,
        fix="correct the field(s) above in the YAML file or the --set override (`--print-config` on an example "
        "from jobs/configs/ prints every field with its default)",
    )


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data: dict | None = None,
    check_paths: bool = True,
) -> T:
    """Read YAML ``path`` (or ``data``), apply ``key=value`` overrides, validate into ``cls``. Local paths become
    absolute; with ``check_paths`` (the default) one that does not exist is an error naming its field (off: a
    cluster config checked on a machine without its shared storage)."""
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
                f"cannot apply override {ov!r}: its key path does not lead to a field",
                where=f"--set {ov}",
                fix="check the key path against the config (`--print-config` prints it); list items are numbered "
                "from 0",
            ) from None
    try:
        return cls.model_validate(tree, context=CHECK_PATHS if check_paths else None)
    except ValidationError as e:
        raise _format_validation_error(e, cls, source, overrides) from None


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML (what was actually run), for logs and MLflow."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def on_off(v):
    """YAML 1.1 reads unquoted on/off as booleans; accept them for the on/off/auto switches."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
