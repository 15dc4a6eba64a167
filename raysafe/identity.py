"""Identity of results: content fingerprints of what produced an output (its rows, config, weights, inputs)."""

from __future__ import annotations

import hashlib

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
