"""Result tables on disk: ``<name>.parquet`` (every column) beside ``<name>.csv`` (the flat columns, for a quick look),
each written atomically so that a killed run never leaves a half-written table."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from raysafe.atomic import atomic_write_bytes, atomic_write_parquet


def write_table(df: pl.DataFrame, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``df`` as ``out_dir/name.parquet`` and ``out_dir/name.csv``; returns both paths. List, array and struct
    columns (e.g. vectors) go to the Parquet file only: CSV cannot hold them."""
    out = Path(out_dir)
    pq_path, csv_path = out / f"{name}.parquet", out / f"{name}.csv"
    atomic_write_parquet(pq_path, df.to_arrow())
    flat = [c for c, t in df.schema.items() if not isinstance(t, (pl.List, pl.Array, pl.Struct))]
    buf = io.BytesIO()
    df.select(flat).write_csv(buf)
    atomic_write_bytes(csv_path, buf.getvalue())
    return pq_path, csv_path
