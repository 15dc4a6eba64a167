"""Translating one (language, input shard) cell, as a function (plain loops, the benchmark) and as a Ray Data actor
stage (one translator and one language identifier loaded per actor).

Each field of a row (``text``; or ``prompt``, ``chosen``, ``rejected`` of a preference pair) is translated on its
own, so a pair keeps its structure; each output is back-translated (round trip) and scored. The cell's Parquet file
and then its done-marker are written atomically; one summary row per cell comes back.
"""

from __future__ import annotations

import math
import time

import numpy as np
import polars as pl

from raysafe.atomic import atomic_write_json, atomic_write_parquet
from raysafe.errors import DataError
from raysafe.translate.config import QualitySpec, TranslatorSpec
from raysafe.translate.quality import chrf, length_ratio, make_identifier, unk_rate
from raysafe.translate.store import TranslationStore
from raysafe.translate.translators import InputTooLong

CELL_SCHEMA = {
    "row_id": pl.Int64,
    "group_id": pl.String,
    "lang": pl.String,
    "field": pl.String,
    "source_text": pl.String,
    "text": pl.String,
    "back_text": pl.String,
    "n_tokens": pl.Int64,
    "n_unk": pl.Int64,
    "langid_lang": pl.String,
    "langid_prob": pl.Float64,
    "chrf_round_trip": pl.Float64,
    "length_ratio": pl.Float64,
    "unk_rate": pl.Float64,
}


def _translate(translator, texts: list[str], src: str, tgt: str, meta: pl.DataFrame, field: str):
    try:
        return translator.translate(texts, src, tgt)
    except InputTooLong as e:
        r = meta.row(e.index, named=True)
        raise DataError(
            e.what,
            where=f"row_id {r['row_id']}, group_id {r['group_id']!r}, field {field!r}, {src} -> {tgt}",
            fix=e.fix,
        ) from None


def translate_cell(
    translator,
    identifier,
    store: TranslationStore,
    k: int,
    lang: str,
    source_lang: str,
    fields: list[str],
    round_trip: bool,
) -> dict:
    """Translate input shard ``k`` into ``lang``, score it, write the cell and its marker; return its summary."""
    t0 = time.perf_counter()
    inputs = pl.from_arrow(store.read_input(k))
    frames = []
    sentences = 0
    for field in fields:
        src = inputs[field].to_list()
        outs = _translate(translator, src, source_lang, lang, inputs, field)
        texts = [o.text for o in outs]
        sentences += len(src)
        back = [None] * len(texts)
        if round_trip:
            keep = [i for i, t in enumerate(texts) if t.strip()]
            if keep:
                backs = _translate(translator, [texts[i] for i in keep], lang, source_lang, inputs[keep, :], field)
                for i, b in zip(keep, backs):
                    back[i] = b.text
                sentences += len(keep)
        ident = identifier(texts) if identifier is not None else [(None, None)] * len(texts)
        frames.append(
            pl.DataFrame(
                {
                    "row_id": inputs["row_id"],
                    "group_id": inputs["group_id"],
                    "lang": [lang] * len(texts),
                    "field": [field] * len(texts),
                    "source_text": src,
                    "text": texts,
                    "back_text": back,
                    "n_tokens": [o.n_tokens for o in outs],
                    "n_unk": [o.n_unk for o in outs],
                    "langid_lang": [x[0] if x[0] else None for x in ident],
                    "langid_prob": [None if x[1] is None else float(x[1]) for x in ident],
                    "chrf_round_trip": [chrf(b, s) if b is not None else None for b, s in zip(back, src)],
                    "length_ratio": [length_ratio(t, s) for t, s in zip(texts, src)],
                    "unk_rate": [None if math.isnan(u := unk_rate(o.n_unk, o.n_tokens)) else u for o in outs],
                },
                schema=CELL_SCHEMA,
            )
        )
    cell = pl.concat(frames)
    seconds = time.perf_counter() - t0
    atomic_write_parquet(store.shard_path(lang, k), cell.to_arrow())
    summary = {"lang": lang, "shard_id": k, "rows": inputs.height, "sentences": sentences, "seconds": seconds}
    atomic_write_json(store.done_path(lang, k), summary)
    return summary


class TranslateStage:
    """Ray Data stage: {shard_id, lang} → one summary row per cell, after writing the cell's file and marker."""

    def __init__(
        self,
        translator: dict,
        quality: dict,
        store_root: str,
        source_lang: str,
        fields: list[str],
        torch_threads: int | None = None,
    ):
        from raysafe.translate.translators import make_translator

        self.quality = QualitySpec(**quality)
        self.translator = make_translator(TranslatorSpec(**translator), None, torch_threads)
        self.identifier = make_identifier(self.quality.langid)
        self.store = TranslationStore(store_root)
        self.source_lang = source_lang
        self.fields = fields

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"lang": [], "shard_id": [], "rows": [], "sentences": [], "seconds": []}
        for k, lang in zip(batch["shard_id"], batch["lang"]):
            s = translate_cell(
                self.translator,
                self.identifier,
                self.store,
                int(k),
                str(lang),
                self.source_lang,
                self.fields,
                self.quality.round_trip,
            )
            for key in out:
                out[key].append(s[key])
        return {k: np.asarray(v) for k, v in out.items()}
