"""Atomic writes: a file a later run reads is written to a temporary name in its directory, flushed to disk and
renamed over the target, so a killed run leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
