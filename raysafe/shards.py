"""Input shards shared by the sharded flows (extraction, evaluation): validated rows cut into numbered Parquet files
under one directory, with a ``_dataset.json`` marker (the rows' fingerprint and the shard size) written last."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from raysafe.atomic import atomic_write_json, atomic_write_parquet
from raysafe.errors import OutputError


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def input_shard_path(root: Path, k: int) -> Path:
    return Path(root) / f"{shard_name(k)}.parquet"


def write_inputs(root: Path, rows: pl.DataFrame, shard_rows: int, fingerprint: str, what: str) -> int:
    """Write ``rows`` as input shards under ``root`` once (atomically, marker last) and return the shard count; a
    directory prepared for other rows or another shard size is refused, naming both fingerprints and sizes."""
    root = Path(root)
    marker = root / "_dataset.json"
    n_shards = max(1, (rows.height + shard_rows - 1) // shard_rows)
    info = {"fingerprint": fingerprint, "shard_rows": shard_rows, "rows": rows.height, "shards": n_shards}
    if marker.exists():
        old = json.loads(marker.read_text())
        if old["fingerprint"] != fingerprint or old["shard_rows"] != shard_rows:
            raise OutputError(
                f"{root} holds {what} of other inputs (fingerprint {old['fingerprint']}, shard_rows "
                f"{old['shard_rows']}; now {fingerprint}, {shard_rows}): outputs made from them cannot be kept "
                "beside outputs of these",
                where=str(marker),
                fix=f"choose a new output_dir for other {what} or shard sizes (or delete {root.parent} to redo it)",
            )
        return n_shards
    table = rows.to_arrow()
    for k in range(n_shards):
        atomic_write_parquet(input_shard_path(root, k), table.slice(k * shard_rows, shard_rows))
    atomic_write_json(marker, info)
    return n_shards


def read_inputs_marker(root: Path) -> dict | None:
    """The ``_dataset.json`` of an input directory (None when the inputs were never completely written)."""
    marker = Path(root) / "_dataset.json"
    return json.loads(marker.read_text()) if marker.exists() else None
