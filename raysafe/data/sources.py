"""Read rows for a data contract from a bundled fixture, a local file, or a Hugging Face dataset, and validate them.

``load_table(spec, contract)`` returns a pyarrow Table with the contract's columns (optional ones when present) and a
``row_id`` column (0..n-1 in source order), or raises :class:`DataError` naming the file, row, field or language.
"""

from __future__ import annotations

import itertools
import json
import logging
from importlib import resources
from pathlib import Path

import polars as pl

from raysafe.config import SourceSpec
from raysafe.data.adapters import get_adapter
from raysafe.data.languages import is_known
from raysafe.data.schemas import Contract
from raysafe.errors import DataError

log = logging.getLogger(__name__)

FIXTURES = ("safety_prompts", "detox_pairs", "concept_pairs", "preference_pairs", "judge_labelled")


def fixture_path(name: str) -> Path:
    """Path of a bundled fixture JSONL file."""
    if name not in FIXTURES:
        raise DataError(f"unknown fixture {name!r}", where="data.name", fix=f"use one of {', '.join(FIXTURES)}")
    return Path(str(resources.files("raysafe.data").joinpath("fixtures", f"{name}.jsonl")))


def _read_file(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist",
            where="data.path",
            fix="give an existing Parquet/JSONL/CSV file or directory",
        )
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return pl.read_parquet(str(path / "**" / "*.parquet"))
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            return pl.DataFrame(json.loads(path.read_text(encoding="utf-8")), strict=False)
        if suffix in (".csv", ".tsv"):
            return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=10000)
    except (pl.exceptions.PolarsError, json.JSONDecodeError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}", where=str(path), fix="check the file's format") from None
    raise DataError(
        f"unsupported file type {suffix!r}", where=str(path), fix="use .parquet, .jsonl, .json, .csv or .tsv"
    )


def _json_kind(value) -> str | None:
    """The JSON type of a value as a user would name it; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object"


def _read_jsonl(path: Path) -> pl.DataFrame:
    """Rows of a JSONL file. Each line must be UTF-8 and a JSON object, and each field must keep one JSON type across
    the rows: a number among strings is an error naming its line, never silently turned into text."""
    rows = []
    kinds: dict[str, tuple[str, int]] = {}  # field -> (JSON type, first line holding it)
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"line {i} is not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})",
                    where=f"{path}:{i}",
                    fix="re-encode the file as UTF-8 (e.g. `iconv -f <its encoding> -t utf-8`)",
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"line {i} is not valid JSON: {e.msg}", where=f"{path}:{i}", fix="fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"line {i} holds a JSON {_json_kind(row) or 'null'}, not an object",
                    where=f"{path}:{i}",
                    fix='write one object per line, e.g. {"group_id": "g1", "lang": "en", "text": "..."}',
                )
            for key, value in row.items():
                kind = _json_kind(value)
                if kind is None:
                    continue
                first = kinds.setdefault(key, (kind, i))
                if first[0] != kind:
                    raise DataError(
                        f"field {key!r} on line {i} holds a {kind} ({value!r}) where line {first[1]} holds a "
                        f"{first[0]}",
                        where=f"{path}:{i}, field {key}",
                        fix=f"give {key!r} one type in every row (quote numbers meant as text)",
                    )
            rows.append(row)
    return pl.DataFrame(rows, strict=False, infer_schema_length=None)


def _hub_part(spec: SourceSpec, subset: str | None, split: str) -> pl.DataFrame:
    """One split of one subset. With ``limit_per_lang`` (and no ``items_per_class``) it is streamed and only its first
    rows are read; otherwise it is downloaded once into the Hugging Face cache (HF_HOME) and read from there."""
    import datasets

    stream = spec.limit_per_lang is not None and spec.items_per_class is None
    try:
        ds = datasets.load_dataset(spec.path, subset, split=split, streaming=stream)
        if stream:
            rows = list(itertools.islice(iter(ds), spec.limit_per_lang))
            return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
    except Exception as e:  # datasets raises many types (connection, missing config, ...)
        raise DataError(
            f"cannot load hub dataset {spec.path!r} (subset {subset!r}, split {split!r}): {str(e).splitlines()[0]}",
            where="data.path",
            fix="check the dataset id, subset and split; without network use a local file or a bundled fixture",
        ) from None
    return pl.from_arrow(ds.data.table)


def _read_hub(spec: SourceSpec) -> pl.DataFrame:
    def one(subset: str | None, split: str | None = None) -> pl.DataFrame:
        return _hub_part(spec, subset, split or spec.split or "train")

    if spec.subsets_by_lang:
        frames = [one(sub).with_columns(pl.lit(lang).alias("lang")) for lang, sub in spec.subsets_by_lang.items()]
        return pl.concat(frames, how="diagonal_relaxed")
    if spec.splits_by_lang:
        frames = [
            one(spec.subset, split).with_columns(pl.lit(lang).alias("lang"))
            for lang, split in spec.splits_by_lang.items()
        ]
        return pl.concat(frames, how="diagonal_relaxed")
    return one(spec.subset)


def _source_label(spec: SourceSpec) -> str:
    return f"fixture {spec.name}" if spec.kind == "fixture" else str(spec.path)


def read_source(spec: SourceSpec, contract: Contract | None = None) -> pl.DataFrame:
    """Raw rows of a source, mapped by its adapter (to ``contract``'s view when given), columns renamed per
    ``spec.columns``, constant language applied, filters applied."""
    adapter = get_adapter(spec.adapter) if spec.adapter else None
    if adapter is not None and spec.kind == "hub":
        spec = spec.model_copy(update=adapter.hub_defaults(spec))
    if spec.kind == "fixture":
        df = _read_jsonl(fixture_path(spec.name))
    elif spec.kind == "file":
        df = _read_file(Path(spec.path).expanduser())
    else:
        df = _read_hub(spec)
    if adapter is not None:
        if spec.lang is not None and "lang" not in df.columns:
            df = df.with_columns(pl.lit(spec.lang).alias("lang"))
        view = adapter.view_for(contract.name if contract is not None else None, spec.contract)
        df = adapter.apply(df, view, _source_label(spec))
    if spec.columns:
        missing = [c for c in spec.columns if c not in df.columns]
        if missing:
            raise DataError(
                f"columns {missing} named in data.columns are not in the source (it has {df.columns})",
                where=_source_label(spec),
                fix="map existing source columns to contract columns",
            )
        df = df.rename(spec.columns)
    if spec.lang is not None:
        df = df.with_columns(pl.lit(spec.lang).alias("lang"))
    if spec.label_map and "label" in df.columns:
        df = _map_labels(df, spec.label_map, _source_label(spec))
    if spec.languages and "lang" in df.columns:
        have = set(df["lang"].cast(pl.String).unique().to_list())
        absent = [lang for lang in spec.languages if lang not in have]
        if absent:
            raise DataError(
                f"data.languages asks for {absent}, which the source has no rows in",
                where=f"{_source_label(spec)}, field lang",
                fix=f"drop them from data.languages; the source has {sorted(x for x in have if x is not None)}",
            )
        df = df.filter(pl.col("lang").is_in(spec.languages))
    if spec.limit_per_lang and "lang" in df.columns:
        df = df.with_row_index("_i").filter(pl.int_range(pl.len()).over("lang") < spec.limit_per_lang).drop("_i")
    elif spec.limit_per_lang:  # a single-language source (e.g. English preference pairs): the first rows
        df = df.head(spec.limit_per_lang)
    if spec.items_per_class:
        df = _items_per_class(df, spec.items_per_class, _source_label(spec))
    return df


def _map_labels(df: pl.DataFrame, label_map: dict[str, int], where: str) -> pl.DataFrame:
    """Replace raw labels by ``label_map``'s ints; a raw value the map lacks is an error naming it and its rows."""
    raw = df["label"].cast(pl.String)
    unmapped = df.with_row_index("_row").filter(raw.is_not_null() & ~raw.is_in(list(label_map)))
    if unmapped.height:
        values = sorted(set(unmapped["label"].cast(pl.String).to_list()))
        rows = ", ".join(str(r) for r in unmapped["_row"].head(5).to_list())
        raise DataError(
            f"label value(s) {values} are not in data.label_map {label_map}",
            where=f"{where}, field label, row(s) {rows}" + (" ..." if unmapped.height > 5 else ""),
            fix="add them to data.label_map, or drop those rows from the source",
        )
    return df.with_columns(raw.replace_strict(label_map, default=None, return_dtype=pl.Int64).alias("label"))


def _items_per_class(df: pl.DataFrame, n: int, where: str) -> pl.DataFrame:
    """Rows of the first ``n`` group_ids of each class (label or concept, and split), in source order: the same items
    in every language, so a subset of a parallel set stays parallel."""
    if "group_id" not in df.columns:
        raise DataError(
            "items_per_class needs a group_id column (one id per item across its translations)",
            where=where,
            fix="map the item id column to group_id in data.columns, or use data.limit_per_lang",
        )
    strata = [c for c in ("label", "concept", "split") if c in df.columns]
    items = df.select("group_id", *strata).unique(subset="group_id", keep="first", maintain_order=True)
    if strata:
        items = items.filter(pl.int_range(pl.len()).over(strata) < n)
    else:
        items = items.head(n)
    return df.join(items.select("group_id"), on="group_id", how="semi", maintain_order="left")


def _rows_desc(bad: pl.DataFrame) -> str:
    """The first five offending rows by row_id, group_id and lang, for an error's ``where``."""
    cols = [c for c in ("row_id", "group_id", "lang") if c in bad.columns]
    return "; ".join(", ".join(f"{c}={r[c]!r}" for c in cols) for r in bad.head(5).select(cols).iter_rows(named=True))


def _check_columns_and_rows(df: pl.DataFrame, contract: Contract, where: str) -> None:
    """Every required column is there and the source has rows."""
    missing = [c for c in contract.required if c not in df.columns]
    if missing:
        raise DataError(
            f"{contract.name}: missing column(s) {missing}; the source has {df.columns}",
            where=where,
            fix="map source columns with data.columns (e.g. {sentence: text}) or set data.lang for a one-language source",
        )
    if df.height == 0:
        raise DataError(
            f"{contract.name}: the source has no rows (after filters)",
            where=where,
            fix="check data.languages, data.limit_per_lang and data.items_per_class",
        )


def _check_text_fields(df: pl.DataFrame, contract: Contract, where: str) -> None:
    """Every text field is a string column without empty or missing values."""
    for field in contract.text_fields:
        if df.schema[field] not in (pl.String, pl.Null):
            raise DataError(
                f"{contract.name}: field {field!r} holds {df.schema[field]}, not text",
                where=f"{where}, field {field}",
                fix="make that column a string column",
            )
        bad = df.filter(pl.col(field).is_null() | (pl.col(field).str.strip_chars() == ""))
        if bad.height:
            raise DataError(
                f"{contract.name}: {bad.height} row(s) have an empty or missing {field!r}",
                where=f"{where}: {_rows_desc(bad)}",
                fix="remove or fill those rows",
            )


def _check_groups_and_languages(df: pl.DataFrame, contract: Contract, where: str) -> pl.DataFrame:
    """group_id and lang as strings on every row, every language code known; returns ``df`` with them cast."""
    for col in ("group_id", "lang"):
        if col in df.columns:
            df = df.with_columns(pl.col(col).cast(pl.String))
            bad = df.filter(pl.col(col).is_null())
            if bad.height:
                raise DataError(
                    f"{contract.name}: {bad.height} row(s) have no {col}",
                    where=f"{where}: {_rows_desc(bad)}",
                    fix=f"give every row a {col}",
                )
    if "lang" in df.columns:
        unknown = sorted({c for c in df["lang"].unique().to_list() if not is_known(c)})
        if unknown:
            bad = df.filter(pl.col("lang").is_in(unknown))
            raise DataError(
                f"{contract.name}: unknown language code(s) {unknown}",
                where=f"{where}: {_rows_desc(bad)}",
                fix="use ISO 639-1 codes (en, zh, sw, ...), or list extra codes in RAYSAFE_EXTRA_LANGS",
            )
    return df


def _check_label(df: pl.DataFrame, contract: Contract, where: str) -> pl.DataFrame:
    """Labels, where there are any, as integers; returns ``df`` with them cast."""
    if "label" in df.columns:
        try:
            df = df.with_columns(pl.col("label").cast(pl.Int64, strict=True))
        except pl.exceptions.PolarsError:
            raise DataError(
                f"{contract.name}: field 'label' must hold integers",
                where=f"{where}, field label",
                fix="map labels with data.label_map (e.g. {toxic: 1, neutral: 0})",
            ) from None
    return df


def _check_unique_and_distinct(df: pl.DataFrame, contract: Contract, where: str) -> None:
    """No two rows share the contract's key, and the contract's distinct pair of fields differs on every row."""
    key = [c for c in contract.key if c in df.columns]
    if key:
        dup = df.filter(pl.len().over(key) > 1)
        if dup.height:
            shown = ", ".join(f"{c}" for c in key)
            raise DataError(
                f"{contract.name}: {dup.height} rows share their ({shown}) with another row; the later one would "
                "silently replace the earlier",
                where=f"{where}: {_rows_desc(dup)}",
                fix=f"keep one row per ({shown}): give each item its own group_id, or remove the duplicates",
            )
    if contract.distinct:
        a, b = contract.distinct
        same = df.filter(pl.col(a).str.strip_chars() == pl.col(b).str.strip_chars())
        if same.height:
            raise DataError(
                f"{contract.name}: {same.height} row(s) have {a} equal to {b}, which teaches no preference",
                where=f"{where}: {_rows_desc(same)}",
                fix=f"remove those rows or correct their {a} / {b}",
            )


def validate(df: pl.DataFrame, contract: Contract, where: str) -> pl.DataFrame:
    """Check ``df`` against ``contract``; return it with contract types and a ``row_id``. Raises DataError."""
    _check_columns_and_rows(df, contract, where)
    df = df.with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64))
    _check_text_fields(df, contract, where)
    df = _check_groups_and_languages(df, contract, where)
    df = _check_label(df, contract, where)
    _check_unique_and_distinct(df, contract, where)
    keep = ["row_id"] + [c for c in contract.columns if c in df.columns]
    extra = [c for c in ("category", "concept", "split", "source") if c in df.columns and c not in keep]
    return df.select(keep + extra)


def load_table(spec: SourceSpec, contract: Contract) -> pl.DataFrame:
    """Read and validate a source for ``contract``.

    A source with a ``lang`` column but no ``group_id`` (the textdetox toxicity and ParaDetox sets have none) gets
    one per row, ``<lang>-<position within the language>``: its rows are then not linked across languages."""
    df = read_source(spec, contract)
    if "group_id" in contract.required and "group_id" not in df.columns and "lang" in df.columns:
        log.warning(
            "%s has no group_id column: numbering its rows per language (<lang>-<i>); map an id column with "
            "data.columns to link translations",
            _source_label(spec),
        )
        df = df.with_columns(
            (pl.col("lang").cast(pl.String) + "-" + pl.int_range(pl.len()).over("lang").cast(pl.String)).alias(
                "group_id"
            )
        )
    return validate(df, contract, _source_label(spec))


def to_text_rows(df: pl.DataFrame, contract_name: str) -> pl.DataFrame:
    """Flatten paired contracts to one text per row for extraction, with ``label`` = 1 for the first side.

    detox pairs → (toxic: 1, neutral: 0); concept pairs → (positive: 1, negative: 0); prompt variants pass through.
    """
    pairs = {"parallel detox pairs": ("toxic", "neutral"), "concept pairs": ("positive", "negative")}
    if contract_name not in pairs:
        return df
    first, second = pairs[contract_name]
    keep = [c for c in df.columns if c not in (first, second, "row_id")]
    a = df.select(keep + [pl.col(first).alias("text"), pl.lit(1, pl.Int64).alias("label")])
    b = df.select(keep + [pl.col(second).alias("text"), pl.lit(0, pl.Int64).alias("label")])
    out = pl.concat([a, b]).sort(["group_id", "lang", "label"], descending=[False, False, True], maintain_order=True)
    return out.with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64))
