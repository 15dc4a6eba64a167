"""Held-out cross-lingual consistency of a trained policy: what the MLC loss optimises, measured on prompts the
training never saw.

For held-out items translated into every listed language, the last-prompt-token hidden state at one layer is read
for each language variant (``raysafe.extract``); per item, the rank-1 energy ``σ₁²/Σσ²`` of the row-normalised
[m × hidden] matrix and the mean pairwise cosine are averaged over items (``raysafe.consistency``).
The same items, languages and layer are used for every trial of a sweep, so the numbers compare across trials.
It runs as a Ray task with its own resources (GPU on a cluster), not in the trial's driver process.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from raysafe.config import GpuCount, SourceSpec, Strict
from raysafe.errors import DataError, remote_errors


class ConsistencySpec(Strict):
    enabled: bool = True
    variants: SourceSpec | None = Field(None, description="prompt variants (default: the base config's data.variants)")
    split: str | None = Field("test", description="held-out split (None: every row)")
    languages: list[str] | None = Field(None, description="languages compared (default: the base mixture's)")
    layer: int | float | Literal["final"] | None = Field(
        None,
        description="layer read, in the one layer convention (int 0..depth, depth fraction or 'final'); default: "
        "the base config's mlc.layer, i.e. the representation the MLC loss trains",
    )
    max_items: int = Field(64, ge=1, description="held-out items used (the first ones, by group_id)")
    max_length: int = Field(256, ge=8)
    chat_template: Literal["auto", "on", "off"] = Field("auto", description="auto: when the tokenizer has one")
    cpus: float = Field(1.0, gt=0)
    gpus: GpuCount = Field(0.0, description="GPUs of the measuring task; N ≥ 2 spreads the model over them")
    torch_threads: int | None = Field(None, ge=1)


def heldout_rows(variants: SourceSpec, split: str | None, languages: list[str], max_items: int) -> pl.DataFrame:
    """group_id, lang, text of the first ``max_items`` held-out items that have every language."""
    from raysafe.data import schemas
    from raysafe.data.sources import load_table

    rows = load_table(variants, schemas.PROMPT_VARIANTS)
    if split is not None and "split" in rows.columns:
        rows = rows.filter(pl.col("split") == split)
    rows = rows.filter(pl.col("lang").is_in(languages))
    complete = (
        rows.group_by("group_id")
        .agg(pl.col("lang").n_unique().alias("k"))
        .filter(pl.col("k") == len(languages))
        .sort("group_id")
        .head(max_items)
    )
    if complete.height == 0:
        raise DataError(
            f"no held-out item (split {split!r}) has a prompt variant in every one of {languages}",
            where="evaluation.consistency",
            fix="choose languages every item was translated into, or another split (evaluation.consistency.split)",
        )
    return (
        rows.join(complete.select("group_id"), on="group_id")
        .unique(["group_id", "lang"], keep="first", maintain_order=True)
        .select("group_id", "lang", "text")
        .sort(["group_id", "lang"])
    )


def log_heldout_input(variants: SourceSpec, rows: list[dict]) -> None:
    """The held-out rows the consistency measure reads, as a dataset input of the active MLflow run (the sweep's)."""
    from raysafe import tracking
    from raysafe.identity import fingerprint

    table = pl.DataFrame(rows)
    tracking.log_input("held-out prompt variants", {"variants": variants}, fingerprint(table), table.height, "held-out")


def measure(
    model_path: str,
    rows: list[dict],
    languages: list[str],
    layer: int,
    max_length: int,
    chat_template: str,
    torch_threads: int | None = None,
    use_gpu: bool = False,
) -> dict[str, float]:
    """consistency_rank1_energy, consistency_mean_cosine, consistency_items for the model at ``model_path``."""
    import numpy as np
    import torch

    from raysafe.consistency import consistency, stack_items
    from raysafe.extract.flow import last_token_states

    meta = pl.DataFrame(rows)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    X = last_token_states(
        model_path, meta["text"].to_list(), layer, max_length, chat_template, device, torch_threads=torch_threads
    )
    states, items, _ = stack_items(meta, np.asarray(X), languages, split=None)
    c = consistency(states)
    return {
        "consistency_rank1_energy": c["rank1_energy"],
        "consistency_mean_cosine": c["mean_cosine"],
        "consistency_items": float(len(items)),
    }


def measure_remote(model_path: str, rows: list[dict], languages: list[str], layer: int, spec: ConsistencySpec) -> dict:
    """:func:`measure` as a Ray task with the spec's resources, outside the calling trial's placement group."""
    import ray

    task = ray.remote(measure).options(
        num_cpus=spec.cpus, num_gpus=spec.gpus or None, scheduling_strategy="DEFAULT", max_retries=0
    )
    with remote_errors():
        return ray.get(
            task.remote(
                model_path,
                rows,
                languages,
                layer,
                spec.max_length,
                spec.chat_template,
                spec.torch_threads,
                spec.gpus > 0,
            )
        )
