"""Every error's fix hint names fields and commands that exist.

The hints are collected from the source (each ``fix=`` argument, and the messages of the config models' cross-field
checks), and every name they point a user to is checked: ``raysafe X`` commands against the CLI's sub-commands,
``--options`` against its options, dotted config paths (``data.max_length``, ``extract.on_overflow=truncate``) and
backticked field names against the pydantic config models (with the value, when the field takes fixed values).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

import raysafe
from raysafe.cli import build_parser

ROOT = Path(raysafe.__file__).parent


def _strings(node: ast.AST) -> str:
    """The constant text of an expression (str literals, f-string parts, concatenations); formatted values drop out."""
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def collect_hints() -> list[tuple[str, str]]:
    """(file:line, text) of every ``fix=`` argument in raysafe/, and of every ValueError message in config modules."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_config = path.name == "config.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "fix":
                    out.append((f"{path.relative_to(ROOT.parent)}:{kw.lineno}", _strings(kw.value)))
            if is_config and isinstance(node.func, ast.Name) and node.func.id == "ValueError" and node.args:
                out.append((f"{path.relative_to(ROOT.parent)}:{node.lineno}", _strings(node.args[0])))
    return out


# ------------------------------------------------------------------------------------------ what exists
def _cli() -> tuple[set[str], set[str]]:
    parser = build_parser()
    commands, options = set(), set()
    for action in parser._actions:
        options.update(o for o in action.option_strings if o.startswith("--"))
        for name, sub in (getattr(action, "choices", None) or {}).items():
            if hasattr(sub, "_actions"):
                commands.add(name)
                for a in sub._actions:
                    options.update(o for o in a.option_strings if o.startswith("--"))
    return commands, options


def _config_models() -> list[type[BaseModel]]:
    """Every pydantic model in raysafe's config modules (shared and per flow)."""
    modules = ["raysafe.config"]
    for info in pkgutil.iter_modules(raysafe.__path__):
        if info.ispkg and (ROOT / info.name / "config.py").exists():
            modules.append(f"raysafe.{info.name}.config")
    found: dict[str, type[BaseModel]] = {}
    for name in modules:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__.startswith("raysafe"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


MODELS = _config_models()
COMMANDS, OPTIONS = _cli()
FIELD_NAMES = {name for m in MODELS for name in m.model_fields}
ROOT_NAMES = FIELD_NAMES


def _inner(annotation) -> tuple[type[BaseModel] | None, bool, tuple | None]:
    """(model inside, whether it is an open mapping, Literal values) of an annotation."""
    if annotation is typing.Any:
        return None, True, None
    if typing.get_origin(annotation) is typing.Literal:
        return None, False, typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False, None
    if typing.get_origin(annotation) is dict or annotation is dict:
        return None, True, None
    model, mapping, literal = None, False, None
    for arg in typing.get_args(annotation):
        m, mp, lit = _inner(arg)
        model, mapping, literal = model or m, mapping or mp, literal or lit
    return model, mapping, literal


def _resolves(model: type[BaseModel], keys: list[str], value: str | None) -> bool:
    for i, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            return False
        sub, mapping, literal = _inner(field.annotation)
        last = i == len(keys) - 1
        if last:
            if value is None or literal is None:
                return True
            return value.strip("'\"") in {str(v).lower() if isinstance(v, bool) else str(v) for v in literal}
        if mapping:
            return True  # an open mapping (e.g. evaluation.evaluate, data.columns): keys below are free
        if sub is None:
            return False
        model = sub
    return True


def field_path_exists(path: str, value: str | None = None) -> bool:
    keys = path.replace("[]", "").split(".")
    return any(_resolves(m, keys, value) for m in MODELS)


DOTTED = re.compile(r"(?<![\w/.$-])([a-z_][a-z0-9_]*(?:\[\])?(?:\.[a-z_][a-z0-9_]*(?:\[\])?)+)(?:=([\w'\".-]+))?")
SETTING = re.compile(r"(?<![\w.\[/-])([a-z][a-z0-9]*_[a-z0-9_]*|[a-z]+)=([\w'\"-]+)")
BACKTICKED = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"(?<![\w.\[])raysafe ([A-Za-z_][\w]*)")


def hint_problems(text: str) -> list[str]:
    """What a hint names that does not exist (empty when every name is real)."""
    problems = []
    for cmd in COMMAND.findall(text):
        if cmd not in COMMANDS:
            problems.append(f"command `raysafe {cmd}`")
    for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text):
        if opt not in OPTIONS:
            problems.append(f"option {opt}")
    for path, value in DOTTED.findall(text):
        root = path.split(".")[0].replace("[]", "")
        if root in ROOT_NAMES and not field_path_exists(path, value or None):
            problems.append(f"field {path}" + (f"={value}" if value else ""))
    for name, value in SETTING.findall(text):  # a bare `name=value`: a setting of some config model
        if not any(_resolves(m, [name], value) for m in MODELS if name in m.model_fields):
            problems.append(f"setting {name}={value}")
    for quoted in BACKTICKED.findall(text):
        q = quoted.strip()
        if q.startswith("raysafe ") or q.startswith("--") or " " in q.split(":")[0].strip():
            continue  # commands and options are checked above; other shell lines are not names
        name = q.split(":")[0].split("=")[0].strip()
        if "." in name:
            if not field_path_exists(name):
                problems.append(f"field `{name}`")
        elif name not in FIELD_NAMES:
            problems.append(f"field `{name}`")
    return sorted(set(problems))


HINTS = collect_hints()


def test_hints_are_collected():
    assert len(HINTS) > 100
    assert any("extract.on_overflow=truncate" in text for _, text in HINTS)


@pytest.mark.parametrize("where,text", HINTS, ids=[w for w, _ in HINTS])
def test_every_hint_names_what_exists(where, text):
    assert hint_problems(text) == [], f"{where}: {text!r}"


@pytest.mark.parametrize(
    "text,problem",
    [
        ("check its spelling against `raysafe ExtractConfig`", "command `raysafe ExtractConfig`"),
        ("add it to languages or set always_include_anchor=False", "setting always_include_anchor=False"),
        ("set `always_include_anchor` to false", "field `always_include_anchor`"),
        ("set on_overflow='skip'", "setting on_overflow='skip'"),
        ("set extract.on_overflow='skip'", "field extract.on_overflow='skip'"),
        ("raise data.max_lenght", "field data.max_lenght"),
        ("lower `optim.micro_batchez`", "field `optim.micro_batchez`"),
        ("run with --print-konfig", "option --print-konfig"),
        ("run `raysafe extrakt` first", "command `raysafe extrakt`"),
    ],
)
def test_made_up_names_are_caught(text, problem):
    assert problem in hint_problems(text)


def test_real_names_pass():
    assert (
        hint_problems(
            "raise extract.max_length, or set extract.on_overflow=truncate; run `raysafe extract` with `--print-config`; "
            "set `name` on each model; check sets[].split; lower evaluation.evaluate.ray.num_cpus_per_actor; "
            "set extract_if_missing=true or on_overflow=error"
        )
        == []
    )
