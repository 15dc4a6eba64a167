"""The activation store: Parquet shards partitioned by model, layer and position, written atomically.

Layout under an output directory::

    manifest.json                          models, dataset fingerprint, rows per language (written at the end)
    inputs/shard-00000.parquet             the validated input rows of each shard (row_id, group_id, lang, text, ...)
    <model>/model.json                     model spec, weights fingerprint, layers, positions, dtype, hidden size
    <model>/layer=<L>/position=<p>/shard-00000.parquet   row_id, group_id, lang, label, ..., vector
    <model>/_done/shard-00000.json         written last: the shard is complete for that model

A shard counts as done only when its marker exists, and every file is written to a temporary name and renamed, so
a killed run leaves no half-written file and a re-run redoes exactly the missing shards. Reading one layer of one
model touches only that layer's files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from raysafe.atomic import atomic_write_json, shard_name
from raysafe.errors import OutputError

META_COLUMNS = ("row_id", "group_id", "lang", "label", "split", "source", "concept", "category")


def vectors_to_arrow(x: np.ndarray, dtype: str) -> pa.Array:
    """[n, d] array → Arrow fixed-size-list column (float16 or float32), zero-copy where possible."""
    flat = np.ascontiguousarray(x.astype(np.float16 if dtype == "float16" else np.float32)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[1])


def arrow_to_vectors(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow (fixed-size) list column → [n, d] float32 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1).astype(np.float32, copy=False)


class ActivationStore:
    """Read/write access to one extraction output directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- paths
    def model_dir(self, model: str) -> Path:
        return self.root / model

    def layer_dir(self, model: str, layer: int, position: str) -> Path:
        return self.model_dir(model) / f"layer={layer}" / f"position={position}"

    def input_path(self, k: int) -> Path:
        return self.root / "inputs" / f"{shard_name(k)}.parquet"

    def done_path(self, model: str, k: int) -> Path:
        return self.model_dir(model) / "_done" / f"{shard_name(k)}.json"

    # -- metadata
    def manifest(self) -> dict:
        p = self.root / "manifest.json"
        if not p.exists():
            raise OutputError(
                f"no activations at {self.root} (manifest.json missing)",
                where=str(self.root),
                fix="run `raysafe extract` first, or point to the extraction's output_dir",
            )
        return json.loads(p.read_text())

    def model_info(self, model: str) -> dict:
        p = self.model_dir(model) / "model.json"
        if not p.exists():
            have = ", ".join(self.models()) or "none"
            raise OutputError(
                f"no activations of model {model!r} in {self.root} (it has: {have})",
                where=str(p),
                fix="check the model label, or extract that model first",
            )
        return json.loads(p.read_text())

    def models(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/model.json"))

    def layers(self, model: str) -> list[int]:
        return list(self.model_info(model)["layers"])

    def positions(self, model: str) -> list[str]:
        return list(self.model_info(model)["positions"])

    def done_shards(self, model: str) -> set[int]:
        d = self.model_dir(model) / "_done"
        return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.json")} if d.exists() else set()

    def claim(self, model: str, info: dict) -> None:
        """Record ``info`` as this model's identity in the store, or refuse if the directory holds other activations."""
        p = self.model_dir(model) / "model.json"
        if p.exists():
            old = json.loads(p.read_text())
            for key in (
                "fingerprint",
                "dataset_fingerprint",
                "layers",
                "positions",
                "store_dtype",
                "shard_rows",
                "max_length",
                "truncate",
                "chat_template",
            ):
                if old.get(key) != info.get(key):
                    raise OutputError(
                        f"{self.model_dir(model)} holds activations of model {model!r} made with a different "
                        f"{key} ({old.get(key)!r}, now {info.get(key)!r})",
                        where=str(p),
                        fix="choose a new output_dir, or delete that model's directory to re-extract",
                    )
            return
        atomic_write_json(p, info)

    # -- reading
    def read_layer_table(self, model: str, layer: int, position: str = "last") -> pa.Table:
        d = self.layer_dir(model, layer, position)
        if not d.exists():
            info = self.model_info(model)
            raise OutputError(
                f"no activations for model {model!r}, layer {layer}, position {position!r}",
                where=str(d),
                fix=f"available layers {info['layers']}, positions {info['positions']}",
            )
        files = sorted(d.glob("shard-*.parquet"))
        table = pa.concat_tables([pq.read_table(f) for f in files])
        return table.sort_by("row_id")

    def read_layer(self, model: str, layer: int, position: str = "last") -> tuple[pl.DataFrame, np.ndarray]:
        """(metadata rows, [n, hidden] float32) for one layer of one model, ordered by row_id."""
        t = self.read_layer_table(model, layer, position)
        meta = pl.from_arrow(t.drop_columns(["vector"]))
        return meta, arrow_to_vectors(t.column("vector"))

    def read_layer_torch(self, model: str, layer: int, position: str = "last"):
        import torch

        meta, x = self.read_layer(model, layer, position)
        return meta, torch.from_numpy(x)

    def read_layer_polars(self, model: str, layer: int, position: str = "last") -> pl.DataFrame:
        return pl.from_arrow(self.read_layer_table(model, layer, position))

    def reader(self, position: str = "last"):
        """A ``read_layer(model, layer) -> (meta, X)`` callable for the analysis flows."""
        return lambda model, layer: self.read_layer(model, layer, position)
