"""Identity of a training run: everything that changes its result, stored with the run and every checkpoint.

A run's identity is a flat mapping of named fields:

- every config field except the cosmetic ones (:data:`COSMETIC`: where things go, how often checkpoints are
  written and kept, tracking, resources that do not change the numbers), e.g. ``optim.lr``, ``loss.beta``,
  ``mixture.languages``, ``optim.grad_accum``, ``ray.num_workers``;
- ``data: training samples``: the fingerprint of the loaded training rows (pairs joined to their chosen prompt
  variants, in order), so an edited data file with the same name is another run;
- ``weights: model`` (and ``weights: reference``): the weights fingerprint of ``raysafe.models.loading.resolve``;
- ``package: torch`` / ``transformers`` / ``deepspeed`` (and ``peft`` with LoRA): versions that change the numbers.

The same identity in the same run directory resumes; another one is refused with the differing fields named.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl

from raysafe.errors import OutputError
from raysafe.identity import differences, flatten

IDENTITY_FILE = "run_identity.json"

#: config fields that do not change a run's result (dotted prefixes).
COSMETIC = (
    "tracking",
    "checkpoint.every_n_steps",
    "checkpoint.keep",
    "checkpoint.storage_path",
    "checkpoint.name",
    "checkpoint.max_failures",
    "checkpoint.stop_after_steps",
    "ray.address",
    "ray.capacity",
    "ray.cpus_per_worker",
    "ray.torch_threads",
    "model.name",
    "reference.name",
    "deepspeed.reduce_bucket_size",
    "deepspeed.prefetch_bucket_size",
)
_PACKAGES = ("torch", "transformers", "deepspeed")


def _cosmetic(key: str) -> bool:
    return any(key == c or key.startswith(c + ".") for c in COSMETIC)


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def run_identity(cfg, samples: pl.DataFrame, model_fp: str, reference_fp: str | None) -> dict[str, Any]:
    """The identity fields of a run of ``cfg`` (a TrainConfig) on ``samples`` with the given weights."""
    from raysafe.identity import fingerprint

    flat = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if not _cosmetic(k)}
    flat["data: training samples"] = fingerprint(samples)
    flat["weights: model"] = model_fp
    if reference_fp is not None:
        flat["weights: reference"] = reference_fp
    for pkg in _PACKAGES + (("peft",) if cfg.lora.enabled else ()):
        flat[f"package: {pkg}"] = _version(pkg)
    return flat


def read_identity(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def check_same_run(run_dir: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Refuse a run directory that holds a run of another identity (or one without an identity record)."""
    if old is None:
        held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if any(n.startswith("checkpoint_") or n.startswith("checkpoint_manager") for n in held):
            raise OutputError(
                f"{run_dir} holds a training run with no identity record ({IDENTITY_FILE}): it cannot be told "
                "whether it is this run, so it is not resumed",
                where=str(run_dir),
                fix="start a new run with `--set checkpoint.name=NEW_NAME`, or `--restart` to move the old "
                "run aside and start afresh",
            )
        return
    diff = differences(old, new)
    if diff:
        shown = diff[:12] + ([f"... and {len(diff) - 12} more"] if len(diff) > 12 else [])
        raise OutputError(
            f"{run_dir} holds another training run: resuming it would continue old weights under new settings. "
            "Differing fields (old → new):\n    " + "\n    ".join(shown),
            where=str(run_dir / IDENTITY_FILE),
            fix="give this run its own directory with `--set checkpoint.name=NEW_NAME`, or `--restart` to move "
            "the old run aside (kept as <name>.replaced-<time>) and start afresh",
        )
