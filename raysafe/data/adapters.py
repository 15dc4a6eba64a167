"""Adapters from the papers' data sets, in their published layouts, to raysafe's row contracts.

A source names one with ``adapter:`` (``SourceSpec(kind="hub", path="textdetox/multilingual_paradetox",
adapter="textdetox_paradetox")``). The adapter fills the layout's hub defaults (which split or subset holds which
language) and maps the raw columns to a contract's; the rows then pass the same checks as any other source
(:func:`raysafe.data.sources.validate`). A local copy in the same layout (a hub repository snapshot, a Parquet,
CSV or JSON file) goes through the same mapping with ``kind: file`` or a local directory as ``path``.

Each adapter can give one or more *views*: ``prompt_variants``, ``preference_pairs``, ``parallel_detox`` or
``multiple_choice`` (the evaluation's four-option questions). Which view is taken follows the contract the caller
asks for, else the source's ``contract``, else the adapter's default. docs/data.md lists every set: id, columns,
mapping, licence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from raysafe.errors import DataError

log = logging.getLogger(__name__)

#: contract name (raysafe.data.schemas) -> view key
VIEW_OF_CONTRACT = {
    "prompt variants": "prompt_variants",
    "preference pairs": "preference_pairs",
    "parallel detox pairs": "parallel_detox",
    "concept pairs": "concept_pairs",
}

TEXTDETOX_LANGS = ("en", "ru", "uk", "de", "es", "am", "zh", "ar", "hi")  # the languages of the hidden-space paper
MULTIJAIL_LANGS = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
MMMLU_SUBSETS = {
    "ar": "AR_XY",
    "bn": "BN_BD",
    "de": "DE_DE",
    "es": "ES_LA",
    "fr": "FR_FR",
    "hi": "HI_IN",
    "id": "ID_ID",
    "it": "IT_IT",
    "ja": "JA_JP",
    "ko": "KO_KR",
    "pt": "PT_BR",
    "sw": "SW_KE",
    "yo": "YO_NG",
    "zh": "ZH_CN",
}
MLC_LANGS = ("zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku")  # prompt_<lang> fields of the MLC release


@dataclass(frozen=True)
class Adapter:
    name: str
    hub_id: str
    card: str
    licence: str
    columns: tuple[str, ...]  # raw columns the layout has (checked before mapping)
    views: dict[str, Callable[[pl.DataFrame], pl.DataFrame]]
    default_view: str
    hub_defaults: Callable[[object], dict] = field(default=lambda spec: {})

    def view_for(self, contract_name: str | None, spec_contract: str) -> str:
        want = VIEW_OF_CONTRACT.get(contract_name or "", None)
        if want is None and spec_contract != "auto":
            want = spec_contract
        return want or self.default_view

    def apply(self, df: pl.DataFrame, view: str, where: str) -> pl.DataFrame:
        """Map raw rows of this layout to ``view``'s columns; DataError names missing columns or a missing view."""
        if view not in self.views:
            raise DataError(
                f"adapter {self.name} gives {sorted(self.views)} rows, not {view}",
                where=f"{where}, data.adapter",
                fix=f"set data.contract to one of {sorted(v for v in self.views if v != 'multiple_choice')}, or "
                "use this source where its rows fit",
            )
        df = df.rename({c: c.lstrip("\ufeff") for c in df.columns if c.startswith("\ufeff")})  # CSV byte-order mark
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise DataError(
                f"the source lacks column(s) {missing} of the {self.hub_id} layout (it has {df.columns})",
                where=f"{where}, data.adapter {self.name}",
                fix=f"point data.path at {self.hub_id} or a copy in its layout, or drop data.adapter and map "
                "columns with data.columns",
            )
        try:
            return self.views[view](df)
        except DataError as e:  # a row-level problem: say which source it is in
            raise DataError(e.what, where=f"{where}, {e.where}", fix=e.fix) from None


# ------------------------------------------------------------------------------------------------ helpers
def _numbered(df: pl.DataFrame, prefix: str, by_lang: bool) -> pl.Expr:
    """``<prefix><lang>-<i>`` (position within the language) or ``<prefix><i>`` (position in the source)."""
    i = pl.int_range(pl.len()).over("lang") if by_lang else pl.int_range(pl.len())
    head = pl.lit(prefix) + (pl.col("lang").cast(pl.String) + "-" if by_lang else pl.lit(""))
    return (head + i.cast(pl.String)).alias("group_id")


def _need_lang(df: pl.DataFrame, name: str) -> None:
    if "lang" not in df.columns:
        raise DataError(
            f"adapter {name}: rows have no language",
            where="data.adapter",
            fix="read the hub set by id (each split or subset is one language), or set data.lang for a one-language "
            "file",
        )


# ------------------------------------------------------------------------------------------- textdetox
def _toxicity(df: pl.DataFrame) -> pl.DataFrame:
    _need_lang(df, "textdetox_toxicity")
    return df.select(
        _numbered(df, "", by_lang=True),
        pl.col("lang").cast(pl.String),
        pl.col("text"),
        pl.col("toxic").cast(pl.Int64).alias("label"),
        pl.lit("textdetox/multilingual_toxicity_dataset").alias("source"),
    )


def _paradetox(df: pl.DataFrame) -> pl.DataFrame:
    _need_lang(df, "textdetox_paradetox")
    return df.select(
        _numbered(df, "", by_lang=True),
        pl.col("lang").cast(pl.String),
        pl.col("toxic_sentence").alias("toxic"),
        pl.col("neutral_sentence").alias("neutral"),
        pl.lit("textdetox/multilingual_paradetox").alias("source"),
    )


def _splits_per_language(spec) -> dict:
    """textdetox sets keep one split per language: read those of ``data.languages`` (default: the paper's 9)."""
    if spec.splits_by_lang or spec.subsets_by_lang:
        return {}
    return {"splits_by_lang": {lang: lang for lang in (spec.languages or TEXTDETOX_LANGS)}}


# --------------------------------------------------------------------------------------------- MultiJail
def _multijail(df: pl.DataFrame) -> pl.DataFrame:
    langs = [c for c in MULTIJAIL_LANGS if c in df.columns]
    base = df.select(
        ("multijail-" + pl.col("id").cast(pl.String)).alias("group_id"),
        pl.col("tags").cast(pl.String).alias("category"),
        pl.col("source").cast(pl.String),
        *[pl.col(c).cast(pl.String) for c in langs],
    )
    long = base.unpivot(index=["group_id", "category", "source"], on=langs, variable_name="lang", value_name="text")
    order = {lang: k for k, lang in enumerate(langs)}
    return (
        long.with_columns(pl.lit(1, pl.Int64).alias("label"), pl.col("lang").replace_strict(order).alias("_o"))
        .with_row_index("_r")
        .sort(["_o", "_r"])  # language by language, items in source order
        .select("group_id", "lang", "text", "label", "category", "source")
    )


# ------------------------------------------------------------------------------------------------- MMMLU
def _mmmlu(df: pl.DataFrame) -> pl.DataFrame:
    _need_lang(df, "mmmlu")
    index = pl.col("Unnamed: 0") if "Unnamed: 0" in df.columns else pl.int_range(pl.len()).over("lang")
    return df.select(
        ("q-" + index.cast(pl.String)).alias("group_id"),  # the MMLU test index: the same id in every language
        pl.col("lang").cast(pl.String),
        pl.col("Question").alias("question"),
        pl.concat_list([pl.col(c).cast(pl.String) for c in "ABCD"]).alias("choices"),
        pl.col("Answer").cast(pl.String).alias("answer"),
        pl.col("Subject").cast(pl.String).alias("subject"),
    )


def _mmmlu_subsets(spec) -> dict:
    out: dict = {} if spec.split else {"split": "test"}
    if spec.subsets_by_lang or spec.subset:
        return out
    langs = list(spec.languages or MMMLU_SUBSETS)
    unknown = [lang for lang in langs if lang not in MMMLU_SUBSETS]
    if unknown:
        raise DataError(
            f"openai/MMMLU has no subset for language(s) {unknown}",
            where="data.languages",
            fix=f"choose among {sorted(MMMLU_SUBSETS)} (English MMLU is cais/mmlu)",
        )
    return {**out, "subsets_by_lang": {lang: MMMLU_SUBSETS[lang] for lang in langs}}


# ------------------------------------------------------------------------------------------- PKU-SafeRLHF
def _pku_pairs(df: pl.DataFrame) -> pl.DataFrame:
    safer = pl.col("safer_response_id").cast(pl.Int64)
    return df.select(
        ("pku-" + pl.int_range(pl.len()).cast(pl.String)).alias("group_id"),
        pl.col("prompt"),
        pl.when(safer == 0).then(pl.col("response_0")).otherwise(pl.col("response_1")).alias("chosen"),
        pl.when(safer == 0).then(pl.col("response_1")).otherwise(pl.col("response_0")).alias("rejected"),
        pl.lit("en").alias("lang"),
        pl.lit("PKU-Alignment/PKU-SafeRLHF").alias("source"),
    )


def _pku_prompts(df: pl.DataFrame) -> pl.DataFrame:
    """Each distinct prompt once (a prompt recurs with other response pairs), under its first pair's id."""
    return df.select(
        ("pku-" + pl.int_range(pl.len()).cast(pl.String)).alias("group_id"),
        pl.lit("en").alias("lang"),
        pl.col("prompt").alias("text"),
        pl.lit("PKU-Alignment/PKU-SafeRLHF").alias("source"),
    ).unique(subset="text", keep="first", maintain_order=True)


# ------------------------------------------------------------------------------ MLC release (Yuyan-B/MLC)
def _turn_text(value, row: int, field_name: str) -> str | None:
    """The text of a LLaMA-Factory sharegpt turn (``{"from": "human", "value": ...}``), a one-turn list, or a str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("value", value.get("content"))
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(
                f"field {field_name!r} holds {len(value)} turns; only one-turn prompts map to the contracts",
                where=f"row {row}, field {field_name}",
                fix="keep one-turn items, or flatten the conversation into one prompt",
            )
        return _turn_text(value[0], row, field_name)
    raise DataError(f"field {field_name!r} holds {type(value).__name__}", where=f"row {row}, field {field_name}")


def _mlc_rows(df: pl.DataFrame) -> list[dict]:
    if "prompt" not in df.columns and "instruction" not in df.columns:
        raise DataError(
            f"the source has neither 'prompt' (DPO files) nor 'instruction' (SFT files) (it has {df.columns})",
            where="data.adapter mlc_pku_multilingual",
            fix="point data.path at a multilin-pku-saferlhf-*.json file of the MLC release",
        )
    prompt_field = "prompt" if "prompt" in df.columns else "instruction"
    out = []
    for i, r in enumerate(df.iter_rows(named=True)):
        prompt = _turn_text(r[prompt_field], i, prompt_field)
        if prompt_field == "instruction" and r.get("input"):
            prompt = f"{prompt}\n{r['input']}"  # LLaMA-Factory's alpaca form: instruction, then input
        out.append({"group_id": f"mlc-{i}", "prompt": prompt, "row": r, "i": i})
    return out


def _mlc_pairs(df: pl.DataFrame) -> pl.DataFrame:
    if "chosen" not in df.columns or "rejected" not in df.columns:
        raise DataError(
            "this MLC file has no chosen/rejected answers (the SFT files hold prompts and one output)",
            where="data.adapter mlc_pku_multilingual",
            fix="use the DPO file (multilin-pku-saferlhf-*-train.json) for pairs; the SFT files give prompt variants",
        )
    rows = [
        {
            "group_id": x["group_id"],
            "prompt": x["prompt"],
            "chosen": _turn_text(x["row"]["chosen"], x["i"], "chosen"),
            "rejected": _turn_text(x["row"]["rejected"], x["i"], "rejected"),
            "lang": "en",
            "source": "Yuyan-B/MLC",
        }
        for x in _mlc_rows(df)
    ]
    return pl.DataFrame(
        rows, schema={k: pl.String for k in ("group_id", "prompt", "chosen", "rejected", "lang", "source")}
    )


def _mlc_variants(df: pl.DataFrame) -> pl.DataFrame:
    rows, dropped = [], 0
    for x in _mlc_rows(df):
        rows.append({"group_id": x["group_id"], "lang": "en", "text": x["prompt"], "source": "Yuyan-B/MLC"})
        for lang in MLC_LANGS:
            text = _turn_text(x["row"].get(f"prompt_{lang}"), x["i"], f"prompt_{lang}")
            if text is None or not text.strip():
                dropped += 1  # a missing translation: the item just lacks that language
                continue
            rows.append({"group_id": x["group_id"], "lang": lang, "text": text, "source": "Yuyan-B/MLC"})
    if dropped:
        log.warning("MLC release: %d empty translation(s) skipped; those items lack that language", dropped)
    return pl.DataFrame(rows, schema={k: pl.String for k in ("group_id", "lang", "text", "source")})


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter(
            "textdetox_toxicity",
            "textdetox/multilingual_toxicity_dataset",
            "https://huggingface.co/datasets/textdetox/multilingual_toxicity_dataset",
            "OpenRAIL++",
            ("text", "toxic"),
            {"prompt_variants": _toxicity},
            "prompt_variants",
            _splits_per_language,
        ),
        Adapter(
            "textdetox_paradetox",
            "textdetox/multilingual_paradetox",
            "https://huggingface.co/datasets/textdetox/multilingual_paradetox",
            "OpenRAIL++",
            ("toxic_sentence", "neutral_sentence"),
            {"parallel_detox": _paradetox},
            "parallel_detox",
            _splits_per_language,
        ),
        Adapter(
            "multijail",
            "DAMO-NLP-SG/MultiJail",
            "https://huggingface.co/datasets/DAMO-NLP-SG/MultiJail",
            "MIT",
            ("id", "source", "tags", "en"),
            {"prompt_variants": _multijail},
            "prompt_variants",
            lambda spec: {} if spec.split else {"split": "train"},
        ),
        Adapter(
            "mmmlu",
            "openai/MMMLU",
            "https://huggingface.co/datasets/openai/MMMLU",
            "MIT",
            ("Question", "A", "B", "C", "D", "Answer", "Subject"),
            {"multiple_choice": _mmmlu},
            "multiple_choice",
            _mmmlu_subsets,
        ),
        Adapter(
            "pku_saferlhf",
            "PKU-Alignment/PKU-SafeRLHF",
            "https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF",
            "CC BY-NC 4.0 (non-commercial)",
            ("prompt", "response_0", "response_1", "safer_response_id"),
            {"preference_pairs": _pku_pairs, "prompt_variants": _pku_prompts},
            "preference_pairs",
            lambda spec: {} if spec.split else {"split": "train"},
        ),
        Adapter(
            "mlc_pku_multilingual",
            "Yuyan-B/MLC",
            "https://github.com/Yuyan-B/MLC/tree/main/data",
            "derived from PKU-SafeRLHF: CC BY-NC 4.0 (non-commercial)",
            (),
            {"preference_pairs": _mlc_pairs, "prompt_variants": _mlc_variants},
            "preference_pairs",
        ),
    )
}
ADAPTER_NAMES = tuple(ADAPTERS)


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise DataError(f"unknown adapter {name!r}", where="data.adapter", fix=f"use one of {', '.join(ADAPTERS)}")
    return ADAPTERS[name]
