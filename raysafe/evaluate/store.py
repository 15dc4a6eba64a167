"""The evaluation output directory: input shards, per-model output shards with done-markers, identity records.

Layout under ``output_dir``::

    inputs/prompts/shard-00000.parquet        validated prompt rows of every set (row_id, set, group_id, lang, ...)
    inputs/prompts/_dataset.json              fingerprint and shard size of those rows (written last)
    inputs/mc/...                             the same for the multiple-choice questions
    <model>/model.json                        model identity (weights fingerprint) and generation settings
    <model>/generations/shard-00000.parquet   row_id, set, group_id, lang, prompt, response, n_new_tokens, finish_reason, empty
    <model>/generations/_done/shard-00000.json
    <model>/utility/...                       row_id, group_id, lang, answer, pred, correct, scores
    <model>/judgements/<judge>/...            row_id, ..., verdict, refusal, raw (+ judge.json: the judge's settings)
    metrics/                                  per_language, summary, agreement_pairs, utility (Parquet + CSV), figures

Every file is written to a temporary name and renamed; a shard counts as done only when its marker exists, so a
killed run loses at most the shards in flight and a re-run redoes exactly the missing ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from raysafe.atomic import atomic_write_json, atomic_write_parquet, shard_name
from raysafe.errors import OutputError


class ShardDir:
    """A directory of ``shard-NNNNN.parquet`` files with ``_done/shard-NNNNN.json`` markers."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, k: int) -> Path:
        return self.root / f"{shard_name(k)}.parquet"

    def done_path(self, k: int) -> Path:
        return self.root / "_done" / f"{shard_name(k)}.json"

    def done(self) -> set[int]:
        d = self.root / "_done"
        return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.json")} if d.exists() else set()

    def missing(self, n_shards: int) -> list[int]:
        done = self.done()
        return [k for k in range(n_shards) if k not in done]

    def info(self, k: int) -> dict | None:
        """The done-marker's content of shard ``k`` (None when the shard is not done)."""
        p = self.done_path(k)
        return json.loads(p.read_text()) if p.exists() else None

    def stale_or_missing(self, n_shards: int, key: str, expected: dict[int, str | None]) -> list[int]:
        """Shards not done, or done from another version of their input (marker ``key`` != ``expected[k]``)."""
        out = []
        for k in range(n_shards):
            info = self.info(k)
            if info is None or info.get(key) != expected.get(k):
                out.append(k)
        return out

    def write(self, k: int, table: pa.Table, summary: dict) -> None:
        """Write shard ``k`` and then its done-marker (both atomically)."""
        atomic_write_parquet(self.path(k), table)
        atomic_write_json(self.done_path(k), summary)

    def summaries(self) -> list[dict]:
        d = self.root / "_done"
        return [json.loads(p.read_text()) for p in sorted(d.glob("shard-*.json"))] if d.exists() else []

    def read(self, n_shards: int) -> pl.DataFrame:
        files = [self.path(k) for k in range(n_shards)]
        absent = [str(f) for k, f in enumerate(files) if k not in self.done()]
        if absent:
            raise OutputError(
                f"{len(absent)} shard(s) missing in {self.root}",
                where=absent[0],
                fix="re-run the same command: it resumes from the shards already written",
            )
        return pl.from_arrow(pa.concat_tables([pq.read_table(f) for f in files], promote_options="default"))


def claim(path: Path, info: dict, what: str) -> None:
    """Record ``info`` as the identity of an output directory, or refuse when it holds other outputs."""
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
        if diff:
            key = diff[0]
            raise OutputError(
                f"{path.parent} holds {what} made with a different {key} ({old.get(key)!r}, now {info.get(key)!r})",
                where=str(path),
                fix=f"choose a new output_dir, or delete {path.parent} to redo the {what}",
            )
        return
    atomic_write_json(path, info)


def write_inputs(root: Path, rows: pl.DataFrame, shard_rows: int, fingerprint: str, what: str) -> int:
    """Write input shards once (atomically, marker last); refuse a directory prepared for other inputs."""
    marker = root / "_dataset.json"
    n_shards = max(1, (rows.height + shard_rows - 1) // shard_rows)
    info = {"fingerprint": fingerprint, "shard_rows": shard_rows, "rows": rows.height, "shards": n_shards}
    if marker.exists():
        old = json.loads(marker.read_text())
        if old["fingerprint"] != fingerprint or old["shard_rows"] != shard_rows:
            raise OutputError(
                f"{root} holds {what} of other inputs (fingerprint {old['fingerprint']}, shard_rows "
                f"{old['shard_rows']}; now {fingerprint}, {shard_rows})",
                where=str(marker),
                fix="choose a new output_dir for other prompts, questions or shard sizes",
            )
        return n_shards
    table = rows.to_arrow()
    for k in range(n_shards):
        atomic_write_parquet(ShardDir(root).path(k), table.slice(k * shard_rows, shard_rows))
    atomic_write_json(marker, info)
    return n_shards


class EvalStore:
    """Paths of one evaluation output directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def prompts(self) -> ShardDir:
        return ShardDir(self.root / "inputs" / "prompts")

    @property
    def mc(self) -> ShardDir:
        return ShardDir(self.root / "inputs" / "mc")

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def generations(self, model: str) -> ShardDir:
        return ShardDir(self.model_dir(model) / "generations")

    def utility(self, model: str) -> ShardDir:
        return ShardDir(self.model_dir(model) / "utility")

    def judgements(self, model: str, judge: str) -> ShardDir:
        return ShardDir(self.model_dir(model) / "judgements" / judge)

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"
