"""Identity of results: content fingerprints of what produced an output (its rows, config, weights, inputs)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl
import pyarrow as pa


def fingerprint(rows: pl.DataFrame) -> str:
    """SHA-256 (first 20 hex digits) of the rows' Arrow IPC bytes: equal for equal contents, in the same order."""
    h = hashlib.sha256()
    for batch in rows.to_arrow().to_batches(max_chunksize=65536):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:20]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (dotted config paths, as ``--set`` takes them); lists are leaves."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def digest(obj: Any) -> str:
    """SHA-256 (first 20 hex digits) of ``obj`` as canonical JSON (sorted keys): the identity of a record of what
    produced an output (settings, input fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: old → new`` for every field of two flat identities that differs (sorted by field)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {json.dumps(a, default=str)} → {json.dumps(b, default=str)}")
    return out


def analysis_identity(config: dict, inputs: dict) -> str:
    """The identity of an analysis: its config (without ``tracking`` and ``ray``, which change where results are
    logged and how fast they come, not what they are) chained with its inputs' identities."""
    settings = {k: v for k, v in config.items() if k not in ("tracking", "ray")}
    return digest({"config": settings, "inputs": inputs})
