"""Inputs of the evaluation flow: prompt rows of the evaluation sets, reference answers, multiple-choice questions.

``load_prompts(sets)`` returns one validated table (``row_id``, ``set``, ``metric``, ``group_id``, ``lang``, ``text``,
``label``, ``harmful``, ``split``, ``category``, ``reference_safe``, ``reference_unsafe``). ``load_mc(spec)``
returns one table of four-option questions (``row_id``, ``group_id``, ``lang``, ``question``, ``choices``,
``answer`` 0..3, ``subject``) from the bundled ``mc_questions.jsonl``, local files or hub sets such as
``openai/MMMLU`` (columns Question, A, B, C, D, Answer) and ``cais/mmlu`` (question, choices, answer).
Errors name the source, the row (group_id, lang) and the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import polars as pl

from raysafe.config import SourceSpec
from raysafe.data.languages import is_known
from raysafe.data.schemas import PREFERENCE_PAIRS, PROMPT_VARIANTS
from raysafe.data.sources import load_table, read_source, validate
from raysafe.errors import DataError
from raysafe.evaluate.config import EvalSetSpec, UtilitySpec

EVAL_FIXTURES = ("mc_questions",)
PROMPT_COLUMNS = [
    "row_id",
    "set",
    "metric",
    "group_id",
    "lang",
    "text",
    "label",
    "harmful",
    "split",
    "category",
    "reference_safe",
    "reference_unsafe",
]


def _label(spec: SourceSpec) -> str:
    return f"fixture {spec.name}" if spec.kind == "fixture" else str(spec.path)


def _eval_fixture(spec: SourceSpec) -> SourceSpec:
    """Fixtures of this flow (not in raysafe.data.sources.FIXTURES) are read as package files."""
    if spec.kind == "fixture" and spec.name in EVAL_FIXTURES:
        path = Path(str(resources.files("raysafe.data").joinpath("fixtures", f"{spec.name}.jsonl")))
        return SourceSpec(**{**spec.model_dump(), "kind": "file", "path": str(path), "name": None})
    return spec


def _with_group_ids(df: pl.DataFrame, prefix: str) -> pl.DataFrame:
    if "group_id" not in df.columns:
        df = (
            df.with_row_index("_gid")
            .with_columns((pl.lit(f"{prefix}-") + pl.col("_gid").cast(pl.String)).alias("group_id"))
            .drop("_gid")
        )
    return df


def _references(s: EvalSetSpec) -> pl.DataFrame | None:
    if s.references is None:
        return None
    ref = load_table(s.references, PREFERENCE_PAIRS)
    if "lang" not in ref.columns:
        ref = ref.with_columns(pl.lit(s.reference_lang).alias("lang"))
    ref = ref.select(
        "group_id",
        pl.col("lang").fill_null(s.reference_lang),
        pl.col("chosen").alias("reference_safe"),
        pl.col("rejected").alias("reference_unsafe"),
    )
    return ref.unique(["group_id", "lang"], keep="first")


def load_set(s: EvalSetSpec) -> pl.DataFrame:
    """Validated prompt rows of one evaluation set (filters applied; may be empty when filters drop everything)."""
    frames = []
    for k, src in enumerate(s.sources):
        src = _eval_fixture(src)
        raw = _with_group_ids(read_source(src), f"{s.name}{k}")
        df = validate(raw, PROMPT_VARIANTS, _label(src))
        for col, dtype in (("label", pl.Int64), ("split", pl.String), ("category", pl.String)):
            if col not in df.columns:
                df = df.with_columns(pl.lit(None, dtype).alias(col))
        frames.append(df.select("group_id", "lang", "text", "label", "split", "category"))
    df = pl.concat(frames, how="vertical_relaxed")
    if s.split is not None:
        df = df.filter(pl.col("split").is_null() | (pl.col("split") == s.split))
    df = df.with_columns((pl.col("label").is_null() | (pl.col("label") != 0)).alias("harmful"))
    if s.harmful_only:
        df = df.filter(pl.col("harmful"))
    dup = df.filter(pl.struct("group_id", "lang").is_duplicated())
    if dup.height:
        ex = dup.head(3).select("group_id", "lang").rows()
        raise DataError(
            f"evaluation set {s.name!r}: {dup.height} rows repeat a (group_id, lang) pair, e.g. {ex}",
            where=f"sets[{s.name}].sources",
            fix="give each translation of a prompt one row",
        )
    ref = _references(s)
    if ref is not None:
        df = df.join(ref, on=["group_id", "lang"], how="left")
    else:
        df = df.with_columns(
            pl.lit(None, pl.String).alias("reference_safe"), pl.lit(None, pl.String).alias("reference_unsafe")
        )
    return df.with_columns(pl.lit(s.name).alias("set"), pl.lit(s.metric).alias("metric"))


def load_prompts(sets: list[EvalSetSpec]) -> pl.DataFrame:
    """All evaluation sets in one table with a ``row_id`` (0..n-1, sets in config order)."""
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"evaluation set names repeat: {dup}", where="sets[].name", fix="give every set its own name")
    df = pl.concat([load_set(s) for s in sets], how="vertical_relaxed")
    if df.height == 0:
        raise DataError(
            "the evaluation sets hold no prompts after filters (split, harmful_only, languages)",
            where="sets",
            fix="check sets[].split, sets[].harmful_only and the sources' languages",
        )
    df = df.with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64))
    return df.select(PROMPT_COLUMNS)


# ------------------------------------------------------------------------------------------ multiple choice
def _answer_index(v, where: str) -> int:
    if isinstance(v, str):
        s = v.strip().upper()
        if s in ("A", "B", "C", "D"):
            return "ABCD".index(s)
        if s.isdigit():
            v = int(s)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and int(v) == v and 0 <= int(v) <= 3:
        return int(v)
    raise DataError(f"answer {v!r} is not one of A-D or 0-3", where=where, fix="give the correct option as A-D or 0-3")


def _mc_columns(df: pl.DataFrame, where: str) -> pl.DataFrame:
    """Lower-cased column names, lang, question, choices (built from A-D when absent) and answer present."""
    rename = {c: c.lower() for c in df.columns if c in ("Question", "Answer", "Subject", "Choices")}
    df = df.rename(rename)
    if "lang" not in df.columns:
        raise DataError(
            "multiple-choice rows have no language",
            where=where,
            fix="add a lang column or set `lang:` on the source (one source per language for MMMLU)",
        )
    if "question" not in df.columns:
        raise DataError(
            f"multiple-choice rows have no question column (columns: {df.columns})",
            where=where,
            fix="map it with `columns: {<name>: question}`",
        )
    if "choices" not in df.columns:
        if not all(c in df.columns for c in ("A", "B", "C", "D")):
            raise DataError(
                f"multiple-choice rows need a `choices` list or columns A, B, C, D (have {df.columns})",
                where=where,
                fix="map the option columns with `columns:`",
            )
        df = df.with_columns(pl.concat_list([pl.col(c).cast(pl.String) for c in "ABCD"]).alias("choices"))
    if "answer" not in df.columns:
        raise DataError("multiple-choice rows have no answer column", where=where, fix="map it with `columns:`")
    return df


def _mc_row(r: dict, loc: str) -> dict:
    """One checked question: known language, non-empty question, exactly four non-empty options, valid answer."""
    if not is_known(str(r["lang"])):
        raise DataError(
            f"unknown language code {r['lang']!r}",
            where=loc,
            fix="use ISO 639-1 codes, or list extra codes in RAYSAFE_EXTRA_LANGS",
        )
    q = r["question"]
    if not isinstance(q, str) or not q.strip():
        raise DataError("empty or missing question", where=f"{loc}, field question", fix="fill or remove the row")
    ch = r["choices"]
    if ch is None or len(ch) != 4 or any((not isinstance(c, str)) or not c.strip() for c in ch):
        raise DataError(
            f"a question needs exactly 4 non-empty options, got {ch!r}",
            where=f"{loc}, field choices",
            fix="give four options",
        )
    return {
        "group_id": str(r["group_id"]),
        "lang": str(r["lang"]),
        "question": q,
        "choices": list(ch),
        "answer": _answer_index(r["answer"], f"{loc}, field answer"),
        "subject": str(r.get("subject") or ""),
    }


def normalize_mc(df: pl.DataFrame, where: str, prefix: str) -> pl.DataFrame:
    """Raw MC rows (``choices`` list, or columns A-D; ``answer`` letter or index; lower- or capitalised names) →
    (group_id, lang, question, choices, answer, subject). Raises DataError naming the row and field."""
    df = _with_group_ids(_mc_columns(df, where), prefix)
    rows = []
    for i, r in enumerate(
        df.select(
            [c for c in ("group_id", "lang", "question", "choices", "answer", "subject") if c in df.columns]
        ).iter_rows(named=True)
    ):
        rows.append(_mc_row(r, f"{where}: row {i}, group_id={r['group_id']!r}, lang={r['lang']!r}"))
    return pl.DataFrame(
        rows,
        schema={
            "group_id": pl.String,
            "lang": pl.String,
            "question": pl.String,
            "choices": pl.List(pl.String),
            "answer": pl.Int64,
            "subject": pl.String,
        },
    )


def load_mc(spec: UtilitySpec) -> pl.DataFrame:
    frames = []
    for src in spec.sources:
        src = _eval_fixture(src)
        raw = read_source(src)
        if spec.split is not None and "split" in raw.columns:
            raw = raw.filter(pl.col("split") == spec.split)
        # Row-index group ids are shared across sources: MMMLU's per-language subsets are aligned translations.
        frames.append(normalize_mc(raw, _label(src), "q"))
    df = pl.concat(frames) if frames else pl.DataFrame()
    if df.height == 0:
        raise DataError(
            "the utility sources hold no questions",
            where="utility.sources",
            fix="check the sources, or set utility.enabled=false",
        )
    dup = df.filter(pl.struct("group_id", "lang").is_duplicated())
    if dup.height:
        raise DataError(
            f"{dup.height} multiple-choice rows repeat a (group_id, lang) pair, e.g. "
            f"{dup.head(3).select('group_id', 'lang').rows()}",
            where="utility.sources",
            fix="give each source its own group ids (or drop duplicates)",
        )
    return df.with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64))
