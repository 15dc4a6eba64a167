"""Column contracts of the Arrow/Parquet tables that flow between stages (see docs/data.md).

Each contract lists required and optional columns with their Arrow types. ``validate`` checks a table (polars or
pyarrow) against a contract and raises :class:`raysafe.errors.DataError` naming the file, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class Contract:
    name: str
    required: dict[str, pa.DataType]
    optional: dict[str, pa.DataType] = field(default_factory=dict)
    text_fields: tuple[str, ...] = ()  # must be non-empty strings
    key: tuple[str, ...] = ()  # columns that identify a row: no two rows may share them (those present are used)
    distinct: tuple[str, ...] = ()  # text fields that must differ within a row (a pair of two equal answers)

    @property
    def columns(self) -> list[str]:
        return list(self.required) + list(self.optional)


PROMPT_VARIANTS = Contract(
    "prompt variants",
    required={"group_id": pa.string(), "lang": pa.string(), "text": pa.string()},
    optional={"label": pa.int64(), "source": pa.string(), "split": pa.string()},
    text_fields=("text",),
    key=("group_id", "lang"),
)

PREFERENCE_PAIRS = Contract(
    "preference pairs",
    required={"group_id": pa.string(), "prompt": pa.string(), "chosen": pa.string(), "rejected": pa.string()},
    optional={"lang": pa.string(), "source": pa.string(), "split": pa.string()},
    text_fields=("prompt", "chosen", "rejected"),
    key=("group_id", "lang"),
    distinct=("chosen", "rejected"),
)

PARALLEL_DETOX = Contract(
    "parallel detox pairs",
    required={"group_id": pa.string(), "lang": pa.string(), "toxic": pa.string(), "neutral": pa.string()},
    optional={"source": pa.string(), "split": pa.string()},
    text_fields=("toxic", "neutral"),
    key=("group_id", "lang"),
)

CONCEPT_PAIRS = Contract(
    "concept pairs",
    required={
        "group_id": pa.string(),
        "concept": pa.string(),
        "lang": pa.string(),
        "positive": pa.string(),
        "negative": pa.string(),
        "split": pa.string(),
    },
    optional={"source": pa.string()},
    text_fields=("positive", "negative"),
    key=("group_id", "concept", "lang"),
)

# One row per (item, layer, position) of one model; stored partitioned by model/layer so one layer of one
# model reads alone (see raysafe.extract.store).
ACTIVATIONS = Contract(
    "activations",
    required={
        "row_id": pa.int64(),
        "group_id": pa.string(),
        "lang": pa.string(),
        "model": pa.string(),
        "layer": pa.int32(),
        "position": pa.string(),
        "vector": pa.list_(pa.float32()),
    },
    optional={"label": pa.int64(), "split": pa.string(), "source": pa.string(), "n_tokens": pa.int32()},
)

VALUE_CONCEPTS = (
    "morality",
    "deontology",
    "utilitarianism",
    "fairness",
    "truthfulness",
    "toxicity",
    "harmfulness",
)
