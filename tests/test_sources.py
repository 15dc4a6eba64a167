"""Source subsetting: items_per_class keeps classes balanced and items parallel across languages."""

from __future__ import annotations

import polars as pl
import pytest

from raysafe.config import SourceSpec
from raysafe.data.sources import read_source
from raysafe.errors import DataError


def _write(tmp_path, rows) -> str:
    path = tmp_path / "rows.jsonl"
    pl.DataFrame(rows).write_ndjson(path)
    return str(path)


def test_items_per_class_first_items_of_each_class_in_every_language(tmp_path):
    # 6 items: three harmful (label 1) first, then three harmless; languages in different row orders
    rows = []
    for lang, order in (("en", range(6)), ("zh", reversed(range(6)))):
        for i in order:
            rows.append(
                {
                    "group_id": f"g{i}",
                    "lang": lang,
                    "text": f"{lang} {i}",
                    "label": int(i < 3),
                    "split": "test" if i in (2, 5) else "train",
                }
            )
    df = read_source(SourceSpec(kind="file", path=_write(tmp_path, rows), items_per_class=1))
    # per (label, split): the first item in source order → g0 (1, train), g2 (1, test), g3 (0, train), g5 (0, test)
    assert sorted(df["group_id"].unique().to_list()) == ["g0", "g2", "g3", "g5"]
    for lang in ("en", "zh"):  # the same items in each language
        assert sorted(df.filter(pl.col("lang") == lang)["group_id"].to_list()) == ["g0", "g2", "g3", "g5"]
    # limit_per_lang, by contrast, takes the first rows whatever their class
    first = read_source(SourceSpec(kind="file", path=_write(tmp_path, rows), limit_per_lang=2))
    assert first.filter(pl.col("lang") == "en")["label"].to_list() == [1, 1]


def test_items_per_class_on_the_bundled_sets():
    safety = read_source(SourceSpec(kind="fixture", name="safety_prompts", items_per_class=10))
    counts = safety.group_by("lang", "label", "split").len()
    assert counts["len"].min() == counts["len"].max() == 10 and safety["lang"].n_unique() == 10
    concepts = read_source(SourceSpec(kind="fixture", name="concept_pairs", items_per_class=3))
    counts = concepts.group_by("lang", "concept", "split").len()
    assert counts["len"].min() == counts["len"].max() == 3 and concepts["concept"].n_unique() == 7


def test_items_per_class_needs_group_ids(tmp_path):
    path = _write(tmp_path, [{"lang": "en", "text": "a", "label": 1}])
    with pytest.raises(DataError, match="group_id"):
        read_source(SourceSpec(kind="file", path=path, items_per_class=1))
