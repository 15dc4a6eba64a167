"""The translation store: input shards written once, one Parquet shard per (language, input shard), done-markers.

Layout under an output directory::

    inputs/shard-00000.parquet           the source rows of each shard (row_id, group_id, the fields, label, ...)
    inputs/_dataset.json                 the source rows' fingerprint and sharding
    translation.json                     what translates and how it is scored (the store's identity)
    lang=<xx>/shard-00000.parquet        one row per (source row, field): the translation, its round trip, its scores
    _done/lang=<xx>/shard-00000.json     written last: the shard is complete for that language
    translations.parquet, variants.parquet, pairs.parquet, report.json, report.md, figures/   (assembled at the end)

Every file is written atomically (``raysafe.atomic``) and a shard counts only once its marker exists, so a killed run
leaves no half-written file and a re-run translates exactly the missing (language, shard) cells.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from raysafe.atomic import atomic_write_json, atomic_write_parquet, shard_name
from raysafe.errors import OutputError


class TranslationStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def input_path(self, k: int) -> Path:
        return self.root / "inputs" / f"{shard_name(k)}.parquet"

    def shard_path(self, lang: str, k: int) -> Path:
        return self.root / f"lang={lang}" / f"{shard_name(k)}.parquet"

    def done_path(self, lang: str, k: int) -> Path:
        return self.root / "_done" / f"lang={lang}" / f"{shard_name(k)}.json"

    def done_shards(self, lang: str) -> set[int]:
        d = self.root / "_done" / f"lang={lang}"
        return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.json")} if d.exists() else set()

    def read_input(self, k: int):
        return pq.read_table(self.input_path(k))

    def write_inputs(self, rows: pl.DataFrame, shard_rows: int, fp: str) -> int:
        """Write the input shards once; refuse a directory prepared for other source rows. Returns the shard count."""
        marker = self.root / "inputs" / "_dataset.json"
        n_shards = (rows.height + shard_rows - 1) // shard_rows
        if marker.exists():
            old = json.loads(marker.read_text())
            diff = [
                f"{key} ({old.get(key)!r}, now {new!r})"
                for key, new in (("fingerprint", fp), ("shard_rows", shard_rows))
                if old.get(key) != new
            ]
            if diff:
                raise OutputError(
                    f"{self.root} holds translations of other source rows: {', '.join(diff)}",
                    where=str(marker),
                    fix="choose a new output_dir for other rows or sharding, or delete that directory",
                )
            return n_shards
        table = rows.to_arrow()
        for k in range(n_shards):
            atomic_write_parquet(self.input_path(k), table.slice(k * shard_rows, shard_rows))
        atomic_write_json(
            marker, {"fingerprint": fp, "shard_rows": shard_rows, "rows": rows.height, "shards": n_shards}
        )
        return n_shards

    def claim(self, identity: dict) -> None:
        """Record ``identity`` (translator, scoring, source language, contract) or refuse, naming every field that
        differs from the one the directory was made with."""
        p = self.root / "translation.json"
        identity = json.loads(json.dumps(identity))  # as it reads back: tuples become lists
        if p.exists():
            old = json.loads(p.read_text())
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r}, now {identity.get(k)!r}" for k in diff)
                raise OutputError(
                    f"{self.root} holds translations made differently ({shown})",
                    where=str(p),
                    fix="choose a new output_dir, or delete that directory to translate again",
                )
            return
        atomic_write_json(p, identity)

    def read_language(self, lang: str, shards: list[int]) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(self.shard_path(lang, k)) for k in shards], how="vertical_relaxed")
