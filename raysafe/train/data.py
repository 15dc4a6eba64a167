"""Training samples: preference pairs joined to their prompt variants, languages drawn by the mixture.

Validated before any worker starts: a pair whose group lacks a language the mixture needs, or a mixture language
that no group has, is a DataError naming the language and the groups; so is an empty answer.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from raysafe.data import schemas
from raysafe.data.mixture import LanguageMixture
from raysafe.data.sources import load_table
from raysafe.errors import DataError
from raysafe.train.config import MixtureSpec, TrainDataSpec


def build_mixture(spec: MixtureSpec, seed: int) -> LanguageMixture:
    if spec.preset == "dominant_balanced":
        dominant = spec.dominant or spec.anchor
        rest = [lang for lang in spec.languages if lang != dominant]
        return LanguageMixture.dominant_balanced(
            dominant, rest, spec.dominant_share, m=spec.m, always_include_anchor=True, seed=seed
        )
    return LanguageMixture(spec.languages, spec.weights, m=spec.m, anchor=spec.anchor, seed=seed)


def load_samples(data: TrainDataSpec, mixture_spec: MixtureSpec, seed: int) -> pl.DataFrame:
    """One row per pair: sample_idx, group_id, prompt, chosen, rejected, variant_langs[m], variant_texts[m]."""
    pairs = load_table(data.pairs, schemas.PREFERENCE_PAIRS)
    if data.split is not None and "split" in pairs.columns:
        pairs = pairs.filter(pl.col("split") == data.split)
    if pairs.height == 0:
        raise DataError(f"no preference pairs with split={data.split!r}", where="data.pairs", fix="check data.split")
    variants = load_table(data.variants, schemas.PROMPT_VARIANTS)
    langs_needed = list(mixture_spec.languages)
    by_group: dict[str, dict[str, str]] = {}
    for g, lang, text in variants.select("group_id", "lang", "text").iter_rows():
        by_group.setdefault(g, {})[lang] = text
    have_any = {lang for d in by_group.values() for lang in d}
    absent = [lang for lang in langs_needed if lang not in have_any]
    if absent:
        raise DataError(
            f"the mixture asks for language(s) {absent} but the prompt variants have none",
            where=f"mixture.languages / data.variants ({data.variants.name or data.variants.path})",
            fix=f"drop them from mixture.languages or add variants; available: {sorted(have_any)}",
        )
    mixture = build_mixture(mixture_spec, seed)
    rng = np.random.default_rng(seed)
    rows = []
    for r in pairs.iter_rows(named=True):
        avail = by_group.get(r["group_id"], {})
        missing = [lang for lang in langs_needed if lang not in avail]
        if missing and len(langs_needed) == mixture_spec.m:  # every mixture language is needed for every pair
            raise DataError(
                f"pair {r['group_id']!r} has no prompt variant in {missing}, which the mixture asks for",
                where=f"group_id {r['group_id']!r}, language(s) {missing}",
                fix="add the missing variants, drop the language from mixture.languages, or remove the pair",
            )
        chosen_langs = mixture.choose(avail, rng, group_id=r["group_id"])
        rows.append(
            {
                "group_id": r["group_id"],
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "variant_langs": list(chosen_langs),
                "variant_texts": [avail[lang] for lang in chosen_langs],
            }
        )
    return pl.DataFrame(rows).with_row_index("sample_idx").with_columns(pl.col("sample_idx").cast(pl.Int64))


def epoch_order(n: int, epochs: int, seed: int) -> pl.DataFrame:
    """The global sample order: for each epoch a seeded permutation. Columns: epoch, pos, sample_idx."""
    frames = []
    for e in range(epochs):
        perm = np.random.default_rng(seed * 1000 + e).permutation(n)
        frames.append(pl.DataFrame({"epoch": np.full(n, e), "pos": np.arange(e * n, (e + 1) * n), "sample_idx": perm}))
    return pl.concat(frames).with_columns(
        pl.col("epoch").cast(pl.Int64), pl.col("pos").cast(pl.Int64), pl.col("sample_idx").cast(pl.Int64)
    )


def to_collator_samples(batch: dict) -> list[dict]:
    """Ray Data columnar batch → the collator's sample dicts."""
    out = []
    for i in range(len(batch["group_id"])):
        out.append(
            {
                "group_id": str(batch["group_id"][i]),
                "prompt": str(batch["prompt"][i]),
                "chosen": str(batch["chosen"][i]),
                "rejected": str(batch["rejected"][i]),
                "variants": list(
                    zip([str(x) for x in batch["variant_langs"][i]], [str(x) for x in batch["variant_texts"][i]])
                ),
            }
        )
    return out
