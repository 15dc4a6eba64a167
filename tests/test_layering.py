"""The import layering of the package, read from the source with ``ast`` (module-level and function-level imports).

- Shared machinery (config, errors, atomic, identity, locks, consistency, bootstrap, tables, plots, tracking, runtime, data/,
  models/) never imports a flow package.
- A flow imports another flow only through that flow's ``config`` or ``flow`` module.
- ``cli.py``, ``bench.py`` (the registry of every flow's benches) and ``gpu_check.py`` (the GPU check over several
  flows) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raysafe"
FLOWS = {"extract", "separation", "concepts", "train", "evaluate", "sweep", "study", "translate"}
SHARED = {
    "__init__",
    "config",
    "errors",
    "atomic",
    "identity",
    "consistency",
    "bootstrap",
    "locks",
    "tables",
    "plots",
    "tracking",
    "kernels",
    "runtime",
    "data",
    "models",
}
TOP = {"cli", "bench", "gpu_check"}
FLOW_DOORS = {"config", "flow"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import anywhere in ``source``; ``from a import b`` gives ``a.b`` (``b``
    may be a submodule), relative imports are resolved against ``module``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` (dotted, under ``raysafe``) that break the layering, one line each."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in TOP:
        return []
    if top not in SHARED | FLOWS:
        return [
            f"{module}: raysafe.{top} is neither shared machinery nor a flow; classify it in tests/test_layering.py"
        ]
    found = []
    for line, name in imported_modules(source, module, is_package):
        q = name.split(".")
        if q[0] != "raysafe" or len(q) < 2 or q[1] not in FLOWS or q[1] == top:
            continue
        if top in SHARED:
            found.append(f"{module}:{line} imports {name}: shared machinery must not import the {q[1]} flow")
        elif len(q) < 3 or q[2] not in FLOW_DOORS:
            found.append(
                f"{module}:{line} imports {name}: a flow uses another flow only through raysafe.{q[1]}.config "
                f"or raysafe.{q[1]}.flow"
            )
    return found


def test_package_follows_the_import_layering():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, "the package was not found"
    found = []
    for f in files:
        found += violations(module_name(f, PACKAGE), f.read_text(encoding="utf-8"), f.name == "__init__.py")
    assert not found, "import layering broken:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "module, source, culprit",
    [
        # shared machinery importing a flow, at module level and inside a function
        ("raysafe.tables", "from raysafe.train.flow import run_train\n", "raysafe.train.flow.run_train"),
        ("raysafe.models.loading", "def f():\n    import raysafe.extract.stages\n", "raysafe.extract.stages"),
        ("raysafe.data.sources", "from raysafe import sweep\n", "raysafe.sweep"),
        # a flow reaching into another flow's internals, also through a function-level or package import
        (
            "raysafe.separation.flow",
            "from raysafe.extract.store import ActivationStore\n",
            "raysafe.extract.store.ActivationStore",
        ),
        ("raysafe.study.flow", "def g():\n    from raysafe.train import losses\n", "raysafe.train.losses"),
        # a relative import out of a flow resolves to the other flow's module
        ("raysafe.concepts.tables", "from ..evaluate.metrics import x\n", "raysafe.evaluate.metrics.x"),
    ],
)
def test_a_violation_is_reported(module, source, culprit):
    found = violations(module, source)
    assert len(found) == 1 and f"imports {culprit}:" in found[0], found


@pytest.mark.parametrize(
    "module, source",
    [
        ("raysafe.study.flow", "from raysafe.train.flow import run_train\nfrom raysafe.train import config\n"),
        ("raysafe.sweep.trial", "def f():\n    from raysafe.evaluate.config import EvaluateConfig\n"),
        ("raysafe.train.worker", "from raysafe.train.losses import alignment_loss\nfrom .forward import x\n"),
        ("raysafe.models.steering", "from raysafe.models.layers import num_layers\nimport torch\n"),
        ("raysafe.cli", "from raysafe.train.worker import train_loop\n"),
        ("raysafe.bench", "from raysafe.extract.bench import BENCH\n"),
    ],
)
def test_allowed_imports_pass(module, source):
    assert violations(module, source) == []


def test_an_unclassified_package_is_reported():
    assert "neither shared machinery nor a flow" in violations("raysafe.newthing.x", "")[0]


def test_only_tracking_imports_mlflow():
    """Every MLflow call goes through raysafe/tracking.py, so another tracker is one file."""
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        module = module_name(f, PACKAGE)
        if module == "raysafe.tracking":
            continue
        for line, name in imported_modules(f.read_text(encoding="utf-8"), module, f.name == "__init__.py"):
            if name.split(".")[0] == "mlflow":
                found.append(f"{module}:{line} imports {name}")
    assert not found, "mlflow imported outside raysafe.tracking:\n" + "\n".join(found)
    tracking = imported_modules((PACKAGE / "tracking.py").read_text(encoding="utf-8"), "raysafe.tracking", False)
    assert any(name == "mlflow" for _, name in tracking)  # the check looks where the imports are
