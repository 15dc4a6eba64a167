"""Atomic writes: a file a later run reads is written to a temporary name in its directory, flushed to disk and
renamed over the target, so a killed run leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from raysafe.errors import OutputError

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

#: the temporary names of :func:`atomic_write_bytes` / :func:`atomic_write_parquet`: ``.<target name>.<8 random>``
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}$")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True).encode())


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_name(k: int) -> str:
    """The stem of shard ``k`` of a sharded output (``shard-00007``): the unit a flow writes atomically and resumes."""
    return f"shard-{k:05d}"


def remove_stale_temp_files(root: Path) -> int:
    """Delete the temporary files that killed writers left under ``root`` (call only while no one else writes
    there, e.g. under the directory's lock before a resumed run starts); returns how many were removed."""
    n = 0
    for p in root.rglob(".*"):
        if p.is_file() and _TEMP_NAME.match(p.name) and not p.name.endswith(".lock"):
            p.unlink(missing_ok=True)
            n += 1
    if n:
        log.warning("removed %d temporary file(s) left by a killed run under %s", n, root)
    return n


def input_shard_path(root: Path, k: int) -> Path:
    """Input shard ``k`` under an input directory ``root``."""
    return Path(root) / f"{shard_name(k)}.parquet"


def write_inputs(root: Path, rows: pl.DataFrame, shard_rows: int, fingerprint: str, what: str) -> int:
    """Write ``rows`` as input shards under ``root`` once (atomically, the ``_dataset.json`` marker last) and return
    the shard count; a directory prepared for other rows or another shard size is refused, naming both fingerprints
    and sizes. Shared by the sharded flows (extraction, evaluation)."""
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
                fix=f"choose a new output_dir for other {what} or shard sizes, or `--restart` (train, study, sweep, evaluate) "
                f"to move the old outputs aside; for an extraction, delete {root.parent} to redo it",
            )
        return n_shards
    table = rows.to_arrow()
    for k in range(n_shards):
        atomic_write_parquet(input_shard_path(root, k), table.slice(k * shard_rows, shard_rows))
    atomic_write_json(marker, info)
    return n_shards


def read_inputs_marker(root: Path) -> dict | None:
    """The ``_dataset.json`` of an input directory (None when its inputs were never completely written)."""
    marker = Path(root) / "_dataset.json"
    return json.loads(marker.read_text()) if marker.exists() else None
