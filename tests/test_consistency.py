"""Held-out cross-lingual consistency against closed forms."""

import numpy as np
import polars as pl
import pytest

from raysafe.consistency import consistency, consistency_table, stack_items
from raysafe.errors import DataError


def test_collinear_and_orthogonal_limits():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 1, 16))
    collinear = v * rng.uniform(0.5, 2.0, size=(5, 4, 1))  # same direction, different norms
    out = consistency(collinear)
    assert out["rank1_energy"] == pytest.approx(1.0, abs=1e-12) and out["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    ortho = np.stack([np.eye(16)[:4] * s for s in (1.0, 3.0)])  # 4 orthonormal rows per item
    out = consistency(ortho)
    assert out["rank1_energy"] == pytest.approx(0.25, abs=1e-12) and out["mean_cosine"] == pytest.approx(0.0, abs=1e-12)


def test_two_languages_closed_form():
    # for m = 2 unit rows with cosine c the Gram matrix has eigenvalues 1 ± c: rank-1 energy (1 + |c|) / 2
    theta = 0.7
    h = np.array([[[1.0, 0.0], [np.cos(theta), np.sin(theta)]]])
    out = consistency(h)
    assert out["rank1_energy"] == pytest.approx((1 + np.cos(theta)) / 2, abs=1e-12)
    assert out["mean_cosine"] == pytest.approx(np.cos(theta), abs=1e-12)


def test_items_missing_a_language_are_left_out_and_split_is_respected():
    meta = pl.DataFrame(
        {
            "group_id": ["a", "a", "b", "c", "c"],
            "lang": ["en", "ru", "en", "en", "ru"],
            "split": ["test", "test", "test", "train", "train"],
        }
    )
    X = np.arange(10, dtype=np.float32).reshape(5, 2)
    states, items, langs = stack_items(meta, X, ["en", "ru"], "test")
    assert items == ["a"] and langs == ["en", "ru"] and np.array_equal(states[0], X[:2])
    table = consistency_table(lambda _model, _layer: (meta, X), ["base"], [3], ["en", "ru"], None)
    assert table["n_items"].to_list() == [2] and table["layer"].to_list() == [3]
    with pytest.raises(DataError, match="sw"):
        stack_items(meta, X, ["en", "sw"], "test")
