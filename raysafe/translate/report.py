"""The translation outputs: flags from stored scores, the contract files, the per-language report and figures.

``flag(table, thresholds)`` adds ``flagged`` / ``flag_reasons`` to the long table of translations (one row per
source row, language and field); ``variants_table`` and ``pairs_table`` build the PROMPT_VARIANTS and PREFERENCE_PAIRS
contract files (source rows first, then one row per language, quality columns beside the text); ``language_report``
counts rows, flags (per reason) and score distributions per language.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from raysafe.translate.codes import LANGID
from raysafe.translate.quality import FLAG_REASONS, Thresholds, flag_reasons

QUALITY_COLUMNS = ("langid_lang", "langid_prob", "chrf_round_trip", "length_ratio", "unk_rate")
META = ("label", "split", "source", "category")


def _nan(v):
    return math.nan if v is None else v


def flag(table: pl.DataFrame, t: Thresholds) -> pl.DataFrame:
    """``table`` with ``flag_reasons`` (comma-separated, '' when the row passes) and ``flagged``."""
    reasons = [
        ",".join(
            flag_reasons(
                target=r["lang"],
                text=r["text"],
                langid_lang=r["langid_lang"],
                langid_prob=r["langid_prob"],
                chrf_round_trip=r["chrf_round_trip"],
                ratio=_nan(r["length_ratio"]),
                unk=_nan(r["unk_rate"]),
                t=t,
            )
        )
        for r in table.iter_rows(named=True)
    ]
    return table.with_columns(pl.Series("flag_reasons", reasons, pl.String)).with_columns(
        (pl.col("flag_reasons") != "").alias("flagged")
    )


#: the reason a translated pair's rejected answer carries when it reads the same as its chosen answer
SAME_ANSWERS = "same_as_chosen"


def flag_identical_answers(flagged: pl.DataFrame) -> pl.DataFrame:
    """Flag (reason :data:`SAME_ANSWERS`) the ``rejected`` translation of a pair that reads the same as the pair's
    ``chosen`` translation (spaces trimmed): such a pair teaches no preference, and the pairs contract refuses it."""
    if "field" not in flagged.columns or not flagged.filter(pl.col("field") == "rejected").height:
        return flagged
    chosen = flagged.filter(pl.col("field") == "chosen").select(
        "row_id", "lang", pl.col("text").str.strip_chars().alias("_chosen")
    )
    out = flagged.join(chosen, on=["row_id", "lang"], how="left")
    same = (pl.col("field") == "rejected") & (pl.col("text").str.strip_chars() == pl.col("_chosen"))
    return out.with_columns(
        pl.when(same)
        .then(
            pl.when(pl.col("flag_reasons") == "")
            .then(pl.lit(SAME_ANSWERS))
            .otherwise(pl.col("flag_reasons") + "," + SAME_ANSWERS)
        )
        .otherwise(pl.col("flag_reasons"))
        .alias("flag_reasons"),
        (pl.col("flagged") | same.fill_null(False)).alias("flagged"),
    ).drop("_chosen")


def _meta(inputs: pl.DataFrame) -> list[str]:
    return [c for c in META if c in inputs.columns]


def variants_table(
    inputs: pl.DataFrame, flagged: pl.DataFrame, source_lang: str, field: str, exclude_flagged: bool
) -> pl.DataFrame:
    """PROMPT_VARIANTS rows: the source rows (``lang`` = source) and every translation of ``field`` (``text``, or a
    pair's ``prompt``), with the quality columns beside the text; flagged translations left out when asked."""
    meta = _meta(inputs)
    src = inputs.select("group_id", pl.lit(source_lang).alias("lang"), pl.col(field).alias("text"), *meta)
    tr = flagged.filter(pl.col("field") == field)
    if exclude_flagged:
        tr = tr.filter(~pl.col("flagged"))
    tr = tr.join(inputs.select("row_id", *meta), on="row_id", how="left").sort(["lang", "row_id"])
    tr = tr.select("group_id", "lang", "text", *meta, *QUALITY_COLUMNS, "flagged", "flag_reasons")
    return pl.concat([src, tr], how="diagonal_relaxed")


def pairs_table(inputs: pl.DataFrame, flagged: pl.DataFrame, source_lang: str, exclude_flagged: bool) -> pl.DataFrame:
    """PREFERENCE_PAIRS rows, one per (pair, language): prompt, chosen and rejected translated separately, the pair's
    ``group_id`` kept; a translated pair is flagged when any of its three fields is (reasons as ``field:reason``);
    a pair whose answers read the same (:func:`flag_identical_answers`) is always left out."""
    meta = _meta(inputs)
    src = inputs.select("group_id", pl.lit(source_lang).alias("lang"), "prompt", "chosen", "rejected", *meta)
    wide = flagged.pivot(on="field", index=["row_id", "group_id", "lang"], values="text")
    why = (
        flagged.with_columns(
            pl.when(pl.col("flagged"))
            .then(pl.col("field") + ":" + pl.col("flag_reasons").str.replace_all(",", "+"))
            .otherwise(None)
            .alias("why")
        )
        .group_by(["row_id", "lang"])
        .agg(
            pl.col("flagged").any(),
            pl.col("why").drop_nulls().str.join(",").alias("flag_reasons"),
            pl.col("chrf_round_trip").min().alias("chrf_round_trip_min"),
            pl.col("langid_prob").min().alias("langid_prob_min"),
        )
    )
    tr = wide.join(why, on=["row_id", "lang"]).join(inputs.select("row_id", *meta), on="row_id", how="left")
    if exclude_flagged:
        tr = tr.filter(~pl.col("flagged"))
    else:  # a pair with equal answers is left out even when flagged rows are kept: the contract refuses it
        tr = tr.filter(~pl.col("flag_reasons").str.contains(SAME_ANSWERS, literal=True))
    tr = tr.sort(["lang", "row_id"]).select(
        "group_id",
        "lang",
        "prompt",
        "chosen",
        "rejected",
        *meta,
        "chrf_round_trip_min",
        "langid_prob_min",
        "flagged",
        "flag_reasons",
    )
    return pl.concat([src, tr], how="diagonal_relaxed")


def language_report(flagged: pl.DataFrame, rows_per_lang: int, unit_flagged: pl.DataFrame) -> pl.DataFrame:
    """Per language: source rows, translated units (rows, or pairs), flagged and kept units, flags per reason
    (counted over fields), and the medians / means of the scores."""
    per_reason = [
        pl.col("flag_reasons").str.split(",").list.contains(reason).sum().alias(f"flag_{reason}")
        for reason in FLAG_REASONS
    ]
    scores = flagged.group_by("lang").agg(
        pl.len().alias("texts"),
        *per_reason,
        pl.col("chrf_round_trip").median().alias("chrf_median"),
        pl.col("langid_prob").median().alias("langid_prob_median"),
        (pl.col("langid_lang") == pl.col("lang").replace(LANGID)).mean().alias("langid_match_share"),
        pl.col("length_ratio").median().alias("length_ratio_median"),
        pl.col("unk_rate").mean().alias("unk_rate_mean"),
    )
    units = unit_flagged.group_by("lang").agg(pl.len().alias("translated"), pl.col("flagged").sum().alias("flagged"))
    return (
        units.join(scores, on="lang")
        .with_columns(
            pl.lit(rows_per_lang).alias("source_rows"), (pl.col("translated") - pl.col("flagged")).alias("kept")
        )
        .select(
            "lang",
            "source_rows",
            "translated",
            "flagged",
            "kept",
            pl.exclude("lang", "source_rows", "translated", "flagged", "kept"),
        )
        .sort("lang")
    )


def quality_figures(flagged: pl.DataFrame, out_dir: Path) -> list[Path]:
    """One box plot per score (round-trip chrF, langid probability, length ratio): a box per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raysafe.plots import DPI

    out_dir.mkdir(parents=True, exist_ok=True)
    langs = sorted(flagged["lang"].unique().to_list())
    paths = []
    for col, title in (
        ("chrf_round_trip", "round-trip chrF (0-100)"),
        ("langid_prob", "language-ID probability of the target language's answer"),
        ("length_ratio", "length ratio (output / source characters)"),
    ):
        data = [flagged.filter(pl.col("lang") == lang)[col].drop_nulls().drop_nans().to_list() for lang in langs]
        if not any(data):
            continue
        fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(langs) + 2), 3.4))
        ax.boxplot([d if d else [math.nan] for d in data], tick_labels=langs, showfliers=True)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out_dir / f"quality_{col}.png"
        fig.savefig(p, dpi=DPI)
        plt.close(fig)
        paths.append(p)
    return paths
