"""Result tables: Parquet keeps every column, CSV the flat ones; no temporary files left behind."""

from __future__ import annotations

import polars as pl

from raysafe.tables import write_table


def test_write_table_parquet_and_flat_csv(tmp_path):
    df = pl.DataFrame({"lang": ["en", "zh"], "value": [0.5, 0.25], "vector": [[1.0, 2.0], [3.0, 4.0]]})
    pq, csv = write_table(df, tmp_path / "tables", "t")
    assert pl.read_parquet(pq).equals(df)
    assert pl.read_csv(csv).equals(df.select("lang", "value"))
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["t.csv", "t.parquet"]
    write_table(df.head(1), tmp_path / "tables", "t")  # overwritten in place
    assert pl.read_parquet(pq).height == 1
