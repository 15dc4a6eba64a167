"""The two Ray Data stages of extraction, as callable classes (one tokenizer / one model load per actor).

``TokenizeStage`` (CPU) turns an input shard's texts into token ids; ``ExtractorStage`` (GPU or CPU actor) runs the
decoder body up to the deepest requested layer in length-sorted token-budget batches, pools on the device, and writes
the shard's per-layer Parquet files and its done-marker (which carries the model's identity in the store) atomically. Both take and return one row per shard, so the
shard stays the unit of atomic writes and of resume whatever block sizes Ray Data chooses.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysafe.atomic import atomic_write_json, atomic_write_parquet
from raysafe.config import ModelSpec
from raysafe.errors import DataError
from raysafe.extract.config import ExtractSpec
from raysafe.extract.hidden import pooled_hidden_states
from raysafe.extract.store import META_COLUMNS, ActivationStore, vectors_to_arrow
from raysafe.models.batching import pad_batch, plan_token_batches
from raysafe.models.layers import text_config


def tokenize_texts(
    tok, texts: list[str], spec: ExtractSpec, meta: pa.Table | None = None, template: str | None = None
) -> tuple[list[list[int]], int]:
    """Token ids per text, with ``template`` applied (``tokenizer``: the tokenizer's own chat template, as a user turn
    with the generation prompt; ``none``: the raw text with the tokenizer's special tokens; otherwise a format string
    whose ``{text}`` is replaced by the text, then tokenised with special tokens, as Xu et al.'s
    ``template.format(input=…)``); None = ``tokenizer`` when ``spec.chat_template`` is on, else ``none``. Returns the
    ids and the number of texts truncated to ``spec.max_length``.

    Truncation (``spec.truncate``) keeps the first ``max_length`` tokens (``head``, the default, as the authors'
    code) or a leading BOS and the last ``max_length - 1`` tokens (``tail``, which keeps the prompt's end where the
    ``last`` position reads). With ``on_overflow='error'`` a long text raises DataError naming its row.
    """
    if template is None:
        template = "tokenizer" if spec.chat_template else "none"
    if template == "tokenizer":
        if not getattr(tok, "chat_template", None):
            raise DataError(
                "the tokenizer's chat template is asked for, but the tokenizer has none",
                where="extract.chat_template / extract.templates",
                fix="use 'none' (raw text) or a format string with {text} for this model, or an instruct model",
            )
        ids = [
            tok.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for t in texts
        ]
        ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
    elif template == "none":
        ids = tok(texts, add_special_tokens=True)["input_ids"]
    else:
        ids = tok([template.replace("{text}", t) for t in texts], add_special_tokens=True)["input_ids"]
    n_trunc = 0
    out = []
    bos = tok.bos_token_id
    for i, x in enumerate(ids):
        if len(x) > spec.max_length:
            if spec.on_overflow == "error":
                where = f"row {i}"
                if meta is not None:
                    r = meta.slice(i, 1).to_pylist()[0]
                    where = f"row_id {r.get('row_id')}, group_id {r.get('group_id')!r}, lang {r.get('lang')!r}"
                raise DataError(
                    f"text has {len(x)} tokens, over extract.max_length={spec.max_length}",
                    where=where,
                    fix="raise extract.max_length, shorten the text, or set extract.on_overflow=truncate",
                )
            n_trunc += 1
            if spec.truncate == "head":
                x = x[: spec.max_length]
            elif bos is not None and x[0] == bos:
                x = [bos] + x[-(spec.max_length - 1) :]
            else:
                x = x[-spec.max_length :]
        out.append(list(x))
    return out, n_trunc


def pad_token_id(config) -> int:
    """The id that fills padded positions: the config's pad id when it is in the vocabulary, else 0. Padded positions
    are masked out of attention and never pooled, so any in-vocabulary id gives the same vectors."""
    text = text_config(config)
    pad = getattr(text, "pad_token_id", None)
    return pad if isinstance(pad, int) and 0 <= pad < text.vocab_size else 0


def batch_overhead_tokens(spec: ExtractSpec, device: torch.device) -> int:
    """The planner's per-forward cost: the configured value, or 32 tokens on CPU and 256 on an accelerator."""
    if spec.batch_overhead_tokens != "auto":
        return spec.batch_overhead_tokens
    return 32 if device.type == "cpu" else 256


class TokenizeStage:
    """Ray Data stage: {shard_id} → {shard_id, ids (list of token lists), n_truncated}."""

    def __init__(self, model: dict, extract: dict, store_root: str):
        from raysafe.models.loading import load_tokenizer, resolve

        spec = ModelSpec(**model)
        self.tok = load_tokenizer(spec, resolve(spec))
        self.spec = ExtractSpec(**extract)
        self.template = self.spec.template_for(spec.label)
        self.store = ActivationStore(store_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard_ids, all_ids, truncs = [], [], []
        for k in batch["shard_id"]:
            t = pq.read_table(self.store.input_path(int(k)))
            ids, n_trunc = tokenize_texts(self.tok, t.column("text").to_pylist(), self.spec, t, self.template)
            shard_ids.append(int(k))
            all_ids.append(ids)
            truncs.append(n_trunc)
        ids_col = np.empty(len(all_ids), dtype=object)
        ids_col[:] = all_ids
        return {"shard_id": np.array(shard_ids), "ids": ids_col, "n_truncated": np.array(truncs)}


class Extractor:
    """Pooled hidden states for token-id lists; the model is loaded once. Used by the Ray stage and by plain loops."""

    def __init__(
        self, model: dict, extract: dict, layers: list[int], device: str | None = None, torch_threads: int | None = None
    ):
        from raysafe.models.loading import load_causal_lm, resolve

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model_spec = ModelSpec(**model)
        self.resolved = resolve(self.model_spec)
        self.spec = ExtractSpec(**extract)
        self.model = load_causal_lm(self.model_spec, device, self.resolved)
        self.device = next(self.model.parameters()).device
        self.layers = layers
        self.pad_id = pad_token_id(self.model.config)
        self.overhead_tokens = batch_overhead_tokens(self.spec, self.device)

    @functools.cached_property
    def tok(self):
        """The tokenizer, loaded on first use: the model actor gets token ids and never needs it."""
        from raysafe.models.loading import load_tokenizer

        return load_tokenizer(self.model_spec, self.resolved)

    def extract(self, ids: list[list[int]]) -> dict[tuple[int, str], np.ndarray]:
        """{(layer, position): [n, hidden] float32 numpy} in the order of ``ids``."""
        n = len(ids)
        plan = plan_token_batches(
            [len(x) for x in ids], self.spec.max_tokens_per_batch, self.spec.max_rows_per_batch, self.overhead_tokens
        )
        out: dict[tuple[int, str], np.ndarray] = {}
        for rows in plan:
            input_ids, mask = pad_batch([ids[i] for i in rows], self.pad_id, self.spec.padding_side)
            pooled = pooled_hidden_states(
                self.model, input_ids.to(self.device), mask.to(self.device), self.layers, self.spec.positions
            )
            idx = np.asarray(rows)
            for key, v in pooled.items():
                if key not in out:
                    out[key] = np.empty((n, v.shape[1]), dtype=np.float32)
                out[key][idx] = v.cpu().numpy()
        return out


class ExtractorStage(Extractor):
    """Ray Data stage: {shard_id, ids, n_truncated} → one summary row per shard, after writing the shard's files."""

    def __init__(
        self,
        model: dict,
        extract: dict,
        layers: list[int],
        store_root: str,
        model_label: str,
        identity: str,
        torch_threads: int | None = None,
        mlflow: dict | None = None,
    ):
        import socket

        from raysafe import tracking

        super().__init__(model, extract, layers, None, torch_threads)
        # this actor's CPU/memory/GPU use, sampled into the extraction's run (None: system metrics are off); the
        # sampler is a daemon thread that ends with the actor
        self.run_log = tracking.attach(mlflow, node=f"extract-{socket.gethostname()}-{os.getpid()}")
        self.store = ActivationStore(store_root)
        self.label = model_label
        self.identity = identity

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries: dict[str, list] = {"shard_id": [], "rows": [], "tokens": [], "seconds": [], "n_truncated": []}
        for k, ids, n_trunc in zip(batch["shard_id"], batch["ids"], batch["n_truncated"]):
            ids = [list(x) for x in ids]
            t0 = time.perf_counter()
            vectors = self.extract(ids)
            seconds = time.perf_counter() - t0
            self.write_shard(int(k), vectors, ids, int(n_trunc), seconds)
            for key, v in (
                ("shard_id", int(k)),
                ("rows", len(ids)),
                ("tokens", sum(map(len, ids))),
                ("seconds", seconds),
                ("n_truncated", int(n_trunc)),
            ):
                summaries[key].append(v)
        return {k: np.asarray(v) for k, v in summaries.items()}

    def write_shard(
        self, k: int, vectors: dict[tuple[int, str], np.ndarray], ids: list[list[int]], n_trunc: int, seconds: float
    ) -> None:
        inputs = pq.read_table(self.store.input_path(k))
        meta = inputs.select([c for c in META_COLUMNS if c in inputs.column_names])
        n = meta.num_rows
        n_tokens = pa.array([len(x) for x in ids], pa.int32())
        for (layer, position), x in vectors.items():
            table = meta.append_column("model", pa.array([self.label] * n, pa.string()))
            table = table.append_column("layer", pa.array(np.full(n, layer, np.int32)))
            table = table.append_column("position", pa.array([position] * n, pa.string()))
            table = table.append_column("n_tokens", n_tokens)
            table = table.append_column("vector", vectors_to_arrow(x, self.spec.store_dtype))
            atomic_write_parquet(self.store.layer_dir(self.label, layer, position) / f"shard-{k:05d}.parquet", table)
        langs = Counter(meta.column("lang").to_pylist())
        atomic_write_json(
            self.store.done_path(self.label, k),
            {
                "identity": self.identity,
                "rows": n,
                "tokens": int(sum(map(len, ids))),
                "seconds": seconds,
                "n_truncated": n_trunc,
                "rows_per_lang": dict(langs),
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            },
        )
