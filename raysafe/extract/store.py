"""The activation store: Parquet shards partitioned by model, layer and position, written atomically.

Layout under an output directory::

    manifest.json                          models, dataset fingerprint, rows per language (written at the end)
    inputs/shard-00000.parquet             the validated input rows of each shard (row_id, group_id, lang, text, ...)
    inputs/_dataset.json                   fingerprint of those rows and the shard size (written after them)
    <model>/model.json                     model spec, weights fingerprint, layers, positions, dtype, hidden size,
                                           and ``identity``: a digest of every field that shapes the vectors
    <model>/layer=<L>/position=<p>/shard-00000.parquet   row_id, group_id, lang, label, ..., vector
    <model>/_done/shard-00000.json         written last: the shard is complete for that model and that identity

A shard counts as done only when its marker exists and carries the identity in ``model.json``, and every file is
written to a temporary name and renamed, so a killed run leaves no half-written file and a re-run redoes exactly
the missing shards. When a model is extracted again with another identity (other weights at the same path, other
texts, layers, positions, max_length, chat template, padding side, dtype, ...), :meth:`ActivationStore.claim`
drops that model's shards first and every shard is extracted again. Reading one layer of one model touches only
that layer's files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from raysafe.atomic import atomic_write_json, input_shard_path, read_inputs_marker, shard_name
from raysafe.errors import OutputError
from raysafe.identity import digest

log = logging.getLogger(__name__)

META_COLUMNS = ("row_id", "group_id", "lang", "label", "split", "source", "concept", "category")

#: The fields of ``model.json`` that determine the stored vectors: weights, texts and the extraction settings that
#: change a vector (or which vectors exist). Batching and resources are left out: they change speed, not results.
IDENTITY_FIELDS = (
    "fingerprint",
    "dataset_fingerprint",
    "shard_rows",
    "layers",
    "positions",
    "store_dtype",
    "dtype",
    "attn_implementation",
    "max_length",
    "chat_template",
    "truncate",
    "padding_side",
)


def identity_digest(info: dict) -> str:
    """A short digest of ``info``'s :data:`IDENTITY_FIELDS`: equal exactly when the stored vectors would be."""
    return digest({k: info.get(k) for k in IDENTITY_FIELDS})


def identity_changes(old: dict, new: dict, fields=IDENTITY_FIELDS) -> list[str]:
    """``field (old → new)`` for each of ``fields`` that differs between two model records."""
    return [f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in fields if old.get(k) != new.get(k)]


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

    @property
    def inputs_dir(self) -> Path:
        return self.root / "inputs"

    def input_path(self, k: int) -> Path:
        return input_shard_path(self.inputs_dir, k)

    def inputs(self) -> dict | None:
        """The input marker (fingerprint, shard_rows, rows, shards), or None when no inputs were written."""
        return read_inputs_marker(self.inputs_dir)

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

    def stored_info(self, model: str) -> dict | None:
        """``model.json`` of ``model``, or None when the store holds none."""
        p = self.model_dir(model) / "model.json"
        return json.loads(p.read_text()) if p.exists() else None

    def done_shards(self, model: str) -> set[int]:
        """Shards complete for the identity recorded in ``model.json`` (markers of another identity do not count)."""
        d = self.model_dir(model) / "_done"
        info = self.stored_info(model)
        if info is None or not d.exists():
            return set()
        want = info.get("identity")
        done = set()
        for p in d.glob("shard-*.json"):
            if want is None or json.loads(p.read_text()).get("identity") == want:
                done.add(int(p.stem.split("-")[1]))
        return done

    def claim(self, model: str, info: dict) -> list[str]:
        """Record ``info`` (which carries its ``identity``) as this model's identity in the store. When the store
        holds this model's activations of another identity, they are dropped first, so that every shard is
        extracted again; returns the changed fields (empty: nothing was dropped)."""
        p = self.model_dir(model) / "model.json"
        old = self.stored_info(model)
        changed: list[str] = []
        if old is not None:
            if old.get("identity") == info["identity"] and identity_changes(old, info) == []:
                if old != info:  # same vectors, other bookkeeping (e.g. the model moved): keep the shards
                    atomic_write_json(p, info)
                return []
            changed = identity_changes(old, info) or ["identity"]
            log.warning(
                "%s holds activations of model %r made with a different %s: dropping them and extracting every "
                "shard again",
                self.model_dir(model),
                model,
                "; ".join(changed),
            )
            self.drop(model)
        atomic_write_json(p, info)
        return changed

    def drop(self, model: str) -> None:
        """Remove a model's shards: its done-markers first (a kill part-way leaves shards that count as missing)."""
        d = self.model_dir(model)
        shutil.rmtree(d / "_done", ignore_errors=True)
        for layer in d.glob("layer=*"):
            shutil.rmtree(layer, ignore_errors=True)
        (d / "model.json").unlink(missing_ok=True)

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
