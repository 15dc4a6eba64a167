"""The streaming separation driver, shift tables, detox displacement, figures and report on synthetic in-memory
activation stores with planted structure."""

from __future__ import annotations

import logging
import math
import weakref

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from raysafe.errors import DataError, OutputError
from raysafe.separation.metrics import SEPARATION_METRICS
from raysafe.separation.plots import (
    plot_layer_curves,
    plot_pca_scatter,
    plot_shift_heatmap,
)
from raysafe.separation.report import best_layers, write_separation_report
from raysafe.separation.tables import (
    DETOX_METRICS,
    SHIFT_SCHEMA,
    TABLE_SCHEMA,
    SeparationOptions,
    alignment_shift,
    analyse_separation,
    detox_displacement,
    pca_scatter_points,
)

LANGS = ("en", "de", "zh")
LAYERS = (0, 1, 2, 3)
D = 24
N = 120  # items per language (half toxic)
# planted separation of the aligned model at the last layer: English strong, German weak, Chinese none
STRENGTH = {"en": 4.0, "de": 2.0, "zh": 0.0}
FAST = SeparationOptions(k=6, bootstrap=30, probe_folds=3)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tensors here are tiny: one intra-op thread avoids thread hand-off latency on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SyntheticStore:
    """An in-memory activation store: ``read_layer(model, layer)`` returns all languages of one layer, class 1
    shifted along a language-specific axis by STRENGTH × (layer + 1) / 4 (× 0.2 for the base model)."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.calls: list[tuple[str, int]] = []
        self.alive: list[weakref.ref] = []
        self.max_alive_at_call = 0
        self.edit = None  # optional (model, layer, meta, X) -> (meta, X)

    def __call__(self, model: str, layer: int) -> tuple[pl.DataFrame, np.ndarray]:
        if model == "missing-layer-model" and layer == 2:
            raise OutputError(f"no activations for model {model!r}, layer {layer}")
        self.max_alive_at_call = max(self.max_alive_at_call, sum(r() is not None for r in self.alive))
        self.calls.append((model, layer))
        rng = np.random.default_rng([self.seed, layer, 0 if model == "base" else 1])
        metas, xs = [], []
        for li, lg in enumerate(LANGS):
            y = np.tile([1, 0], N // 2)
            X = rng.normal(size=(N, D))
            scale = STRENGTH[lg] * (layer + 1) / 4 * (0.2 if model == "base" else 1.0)
            X[:, li] += scale * y
            xs.append(X.astype(np.float32))
            metas.append(
                pl.DataFrame(
                    {
                        "row_id": [f"{lg}-{i}" for i in range(N)],
                        "group_id": [f"g{i // 2}" for i in range(N)],
                        "lang": [lg] * N,
                        "label": y,
                    }
                )
            )
        meta, X = pl.concat(metas), np.concatenate(xs)
        if self.edit is not None:
            meta, X = self.edit(model, layer, meta, X)
        self.alive.append(weakref.ref(X))
        return meta, X


def _value(t: pl.DataFrame, model: str, lang: str, layer: int, metric: str) -> float:
    r = t.filter(
        (pl.col("model") == model)
        & (pl.col("lang") == lang)
        & (pl.col("layer") == layer)
        & (pl.col("metric") == metric)
    )
    assert r.height == 1
    return r["value"][0]


@pytest.fixture(scope="module")
def clean_table() -> pl.DataFrame:
    return analyse_separation(SyntheticStore(), ["base", "aligned"], list(LAYERS), FAST, progress=False)


# ----------------------------------------------------------------------------------------------------- driver
def test_driver_table_shape_schema_and_planted_structure(clean_table):
    t = clean_table
    assert dict(t.schema) == TABLE_SCHEMA
    assert t.height == 2 * len(LANGS) * len(LAYERS) * len(SEPARATION_METRICS)
    assert set(t["status"].unique()) == {"ok"}
    assert set(t["pca_fit"].unique()) == {"pooled"} and set(t["k"].unique()) == {6}
    assert set(t["n_pos"].unique()) == {N // 2} and set(t["n_neg"].unique()) == {N // 2}
    for metric in (
        "bhattacharyya",
        "silhouette_euclidean",
        "silhouette_cosine",
        "centroid_distance",
        "between_var_ratio",
        "between_var_ratio_full",
    ):
        en, de, zh = (_value(t, "aligned", lg, 3, metric) for lg in LANGS)
        assert en > de > zh, (metric, en, de, zh)
        assert en > _value(t, "base", "en", 3, metric)  # alignment separates English
    assert _value(t, "aligned", "en", 3, "probe_accuracy") > 0.95
    assert abs(_value(t, "aligned", "zh", 3, "probe_accuracy") - 0.5) < 0.15
    # English separation grows with depth in the aligned model
    en_curve = [_value(t, "aligned", "en", layer, "between_var_ratio_full") for layer in LAYERS]
    assert en_curve == sorted(en_curve)
    ok = t.filter(pl.col("metric") != "pca_explained_variance")
    assert (ok["ci_low"] <= ok["ci_high"]).all()


def test_driver_streams_one_layer_of_one_model_at_a_time():
    store = SyntheticStore()
    analyse_separation(store, ["base", "aligned"], [0, 3], FAST, progress=False)
    assert store.calls == [("base", 0), ("base", 3), ("aligned", 0), ("aligned", 3)]
    assert store.max_alive_at_call == 0  # the previous layer's vectors were released before the next read


def test_driver_is_seeded_and_per_language_fit_is_recorded(clean_table):
    again = analyse_separation(SyntheticStore(), ["base", "aligned"], list(LAYERS), FAST, progress=False)
    assert again.equals(clean_table)
    per = analyse_separation(
        SyntheticStore(), ["aligned"], [3], FAST.model_copy(update={"pca_fit": "per_language"}), progress=False
    )
    assert set(per["pca_fit"].unique()) == {"per_language"}
    assert _value(per, "aligned", "en", 3, "bhattacharyya") != _value(clean_table, "aligned", "en", 3, "bhattacharyya")
    assert _value(per, "aligned", "en", 3, "bhattacharyya") > _value(per, "aligned", "zh", 3, "bhattacharyya")


def test_options_are_validated():
    with pytest.raises(ValidationError):
        SeparationOptions(metrics=["bhattacharyya", "nonsense"])
    with pytest.raises(ValidationError):
        SeparationOptions(shrinkage=1.5)
    with pytest.raises(ValidationError):
        SeparationOptions(pca_fit="global")
    assert SeparationOptions(shrinkage=0.2).shrinkage == 0.2


# --------------------------------------------------------------------------------------------------- bad input
def _cell(t: pl.DataFrame, model: str, lang: str, layer: int) -> pl.DataFrame:
    return t.filter((pl.col("model") == model) & (pl.col("lang") == lang) & (pl.col("layer") == layer))


def test_language_with_one_class_is_skipped_and_others_computed(caplog):
    store = SyntheticStore()

    def only_benign_de(model, layer, meta, X):
        keep = ~((meta["lang"] == "de") & (meta["label"] == 1)).to_numpy()
        return meta.filter(pl.Series(keep)), X[keep]

    store.edit = only_benign_de
    with caplog.at_level(logging.WARNING, logger="raysafe.separation.tables"):
        t = analyse_separation(store, ["aligned"], [1], FAST, progress=False)
    de = _cell(t, "aligned", "de", 1)
    assert set(de["status"]) == {"skipped"} and de["value"].is_null().all()
    assert all("'de'" in m and "layer 1" in m and "0 toxic" in m for m in de["message"])
    assert set(_cell(t, "aligned", "en", 1)["status"]) == {"ok"}
    assert any("'de'" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_fewer_items_than_pca_dimensions_is_degraded():
    store = SyntheticStore()

    def tiny_zh(model, layer, meta, X):
        keep = (meta["lang"] != "zh").to_numpy() | (np.arange(meta.height) < 2 * N + 6)
        return meta.filter(pl.Series(keep)), X[keep]

    store.edit = tiny_zh
    opts = FAST.model_copy(update={"pca_fit": "per_language", "k": 10})
    t = analyse_separation(store, ["aligned"], [2], opts, progress=False)
    zh = _cell(t, "aligned", "zh", 2)
    assert set(zh["status"]) == {"degraded"}
    assert (zh["k"] == 5).all()
    assert all("keeps 5 instead of 10" in m and "'zh'" in m for m in zh["message"])
    # the default plain closed form is undefined for 3 items per class in 5 dimensions: no value, the fix named
    assert _value(t, "aligned", "zh", 2, "bhattacharyya") is None
    assert set(_cell(t, "aligned", "en", 2)["status"]) == {"ok"}
    lw = analyse_separation(
        store, ["aligned"], [2], opts.model_copy(update={"shrinkage": "ledoit_wolf"}), progress=False
    )
    assert math.isfinite(_value(lw, "aligned", "zh", 2, "bhattacharyya"))
    bd = lw.filter(pl.col("metric") == "bhattacharyya")
    assert set(bd["shrinkage"]) == {"ledoit_wolf"}  # the table names the option when used


def test_table_names_units_and_the_bhattacharyya_estimator(clean_table):
    t = clean_table
    assert set(t.filter(pl.col("metric") == "bhattacharyya")["shrinkage"]) == {"none"}
    assert (
        t.filter(pl.col("metric") != "bhattacharyya")["shrinkage"].null_count()
        == t.filter(pl.col("metric") != "bhattacharyya").height
    )
    units = dict(t.select("metric", "unit").unique().iter_rows())
    assert units["between_var_ratio"].startswith("fraction") and units["bhattacharyya"] == "nats"
    assert t["unit"].null_count() == 0


def test_non_finite_vectors_are_dropped_and_other_languages_are_untouched():
    store = SyntheticStore()

    def poison_de(model, layer, meta, X):
        X = X.copy()
        X[N + 3, 0] = np.nan
        X[N + 7, 5] = np.inf
        return meta, X

    store.edit = poison_de
    opts = FAST.model_copy(update={"pca_fit": "per_language"})
    t = analyse_separation(store, ["aligned"], [3], opts, progress=False)
    clean = analyse_separation(SyntheticStore(), ["aligned"], [3], opts, progress=False)
    de = _cell(t, "aligned", "de", 3)
    assert set(de["status"]) == {"degraded"}
    assert de["value"].is_not_null().all()
    assert all("dropped 2 of 120 rows with NaN/inf" in m for m in de["message"])
    assert de["n_pos"][0] + de["n_neg"][0] == N - 2
    assert _cell(t, "aligned", "en", 3).equals(_cell(clean, "aligned", "en", 3))


def test_rows_that_differ_between_models_are_flagged_and_the_shift_degraded():
    store = SyntheticStore()

    def fewer_de_rows_in_aligned(model, layer, meta, X):
        if model != "aligned":
            return meta, X
        keep = ~((meta["lang"] == "de").to_numpy() & (np.arange(meta.height) >= 2 * N - 10))
        return meta.filter(pl.Series(keep)), X[keep]

    store.edit = fewer_de_rows_in_aligned
    t = analyse_separation(store, ["base", "aligned"], [0, 3], FAST, progress=False)
    de = _cell(t, "aligned", "de", 3)
    assert set(de["status"]) == {"degraded"}
    assert all("rows differ from model 'base' layer 0" in m and "10 missing" in m for m in de["message"])
    assert set(_cell(t, "aligned", "en", 3)["status"]) == {"ok"}
    assert set(_cell(t, "base", "de", 3)["status"]) == {"ok"}
    shift = alignment_shift(t, "base", "aligned")
    de_shift = shift.filter(pl.col("lang") == "de")
    assert set(de_shift["status"]) == {"degraded"}
    assert all("different item counts" in m for m in de_shift["message"])
    assert set(shift.filter(pl.col("lang") == "en")["status"]) == {"ok"}


def test_unreadable_layer_and_broken_reads_are_skipped_rows(caplog):
    store = SyntheticStore()

    def broken(model, layer, meta, X):
        if layer == 1:
            return meta, X[:-1]  # one vector short
        if layer == 3:
            return meta.drop("label"), X
        return meta, X

    store.edit = broken
    with caplog.at_level(logging.WARNING, logger="raysafe.separation.tables"):
        t = analyse_separation(store, ["aligned", "missing-layer-model"], [0, 1, 2, 3], FAST, progress=False)
    gone = t.filter((pl.col("model") == "missing-layer-model") & (pl.col("layer") == 2))
    assert gone.height == len(LANGS) * len(SEPARATION_METRICS)
    assert set(gone["status"]) == {"skipped"}
    assert all("cannot read model 'missing-layer-model' layer 2" in m for m in gone["message"])
    short = t.filter(pl.col("layer") == 1)
    assert set(short["status"]) == {"skipped"}
    assert all("360 metadata rows but 359 vectors" in m for m in short["message"])
    assert all("lacks column(s) ['label']" in m for m in t.filter(pl.col("layer") == 3)["message"])
    assert set(t.filter(pl.col("layer") == 0)["status"]) == {"ok"}
    assert any("missing-layer-model" in r.getMessage() for r in caplog.records)


def test_no_models_is_a_data_error():
    with pytest.raises(DataError):
        analyse_separation(SyntheticStore(), [], [0], FAST, progress=False)


# ------------------------------------------------------------------------------------------------------- shift
def test_alignment_shift_of_the_synthetic_store(clean_table):
    shift = alignment_shift(clean_table, "base", "aligned")
    assert dict(shift.schema) == SHIFT_SCHEMA
    assert shift.height == len(LANGS) * len(LAYERS) * len(SEPARATION_METRICS)
    r = shift.filter((pl.col("lang") == "en") & (pl.col("layer") == 3) & (pl.col("metric") == "bhattacharyya")).row(
        0, named=True
    )
    assert r["shift"] == pytest.approx(r["aligned_value"] - r["base_value"])
    assert r["shift"] > 0 and r["shift_ratio_en"] == pytest.approx(1.0) and r["shift_diff_en"] == 0.0
    de = shift.filter((pl.col("lang") == "de") & (pl.col("layer") == 3) & (pl.col("metric") == "between_var_ratio"))
    assert 0 < de["shift_ratio_en"][0] < 0.5 and de["shift_diff_en"][0] < 0
    with pytest.raises(DataError):
        alignment_shift(clean_table, "base", "instruct")


def test_alignment_shift_by_hand():
    def row(model, lang, value, lo, hi, status="ok", message="", n=(10, 10)):
        return dict(
            model=model,
            lang=lang,
            layer=0,
            metric="m",
            value=value,
            ci_low=lo,
            ci_high=hi,
            n_pos=n[0],
            n_neg=n[1],
            status=status,
            message=message,
            pca_fit="pooled",
            k=2,
        )

    z = 1.959963984540054
    t = pl.DataFrame(
        [
            row("b", "en", 0.1, 0.1 - z * 0.03, 0.1 + z * 0.03),
            row("a", "en", 0.5, 0.5 - z * 0.04, 0.5 + z * 0.04),
            row("b", "hi", 0.2, None, None),
            row("a", "hi", 0.3, None, None),
            row("b", "sw", 0.2, 0.1, 0.3),
            row("a", "sw", None, None, None, "skipped", "one class"),
        ],
        schema=TABLE_SCHEMA,
    )
    s = alignment_shift(t, "b", "a")
    en = s.filter(pl.col("lang") == "en").row(0, named=True)
    assert en["shift"] == pytest.approx(0.4)
    assert (en["shift_ci_low"], en["shift_ci_high"]) == (pytest.approx(0.4 - z * 0.05), pytest.approx(0.4 + z * 0.05))
    hi = s.filter(pl.col("lang") == "hi").row(0, named=True)
    assert hi["shift"] == pytest.approx(0.1) and hi["shift_ci_low"] is None
    assert hi["shift_ratio_en"] == pytest.approx(0.25) and hi["shift_diff_en"] == pytest.approx(-0.3)
    assert hi["base_ratio_en"] == pytest.approx(2.0) and hi["aligned_ratio_en"] == pytest.approx(0.6)
    sw = s.filter(pl.col("lang") == "sw").row(0, named=True)
    assert sw["status"] == "skipped" and sw["shift"] is None and "aligned: one class" in sw["message"]


# ------------------------------------------------------------------------------------------------------- detox
class DetoxStore:
    """Detox pairs with planted displacements, and a safety set whose English direction is axis 0.

    Aligned model: detox moves en and de along −(toxic − benign) of English (axis 0), zh along axis 2 (orthogonal).
    Base model: every language's detox displacement is along axis 5 (orthogonal to the English direction)."""

    def __init__(self, drop_english_safety: bool = False, lone_toxic_in_de: bool = False):
        self.drop_english_safety = drop_english_safety
        self.lone_toxic_in_de = lone_toxic_in_de

    def detox(self, model: str, layer: int) -> tuple[pl.DataFrame, np.ndarray]:
        rng = np.random.default_rng([layer, 7])
        metas, xs = [], []
        for lg in LANGS:
            m = 40
            base = rng.normal(size=(m, D))
            axis = 5 if model == "base" else (2 if lg == "zh" else 0)
            tox = base.copy()
            tox[:, axis] += 3.0
            neu = base + 0.05 * rng.normal(size=(m, D))
            gids = [f"{lg}{i}" for i in range(m)]
            meta = pl.DataFrame({"group_id": gids + gids, "lang": [lg] * (2 * m), "label": [1] * m + [0] * m})
            X = np.concatenate([tox, neu])
            if lg == "de" and self.lone_toxic_in_de:
                meta = meta.head(2 * m - 3)
                X = X[: 2 * m - 3]
            metas.append(meta)
            xs.append(X.astype(np.float32))
        return pl.concat(metas), np.concatenate(xs)

    def safety(self, model: str, layer: int) -> tuple[pl.DataFrame, np.ndarray]:
        rng = np.random.default_rng([layer, 8])
        metas, xs = [], []
        for li, lg in enumerate(LANGS):
            if lg == "en" and self.drop_english_safety:
                continue
            y = np.tile([1, 0], 30)
            X = rng.normal(size=(60, D)) * 0.1
            X[:, 0 if lg == "en" else 10 + li] += 2.0 * y
            metas.append(pl.DataFrame({"row_id": [f"{lg}{i}" for i in range(60)], "lang": [lg] * 60, "label": y}))
            xs.append(X.astype(np.float32))
        return pl.concat(metas), np.concatenate(xs)


def test_detox_displacement_recovers_the_planted_direction():
    store = DetoxStore()
    t = detox_displacement(store.detox, store.safety, ["base", "aligned"], [0, 2], options=FAST, progress=False)
    assert dict(t.schema) == TABLE_SCHEMA
    assert t.height == 2 * 2 * len(LANGS) * len(DETOX_METRICS)
    assert set(t["status"]) == {"ok"}
    assert _value(t, "aligned", "en", 2, "detox_cos_en") > 0.99
    assert _value(t, "aligned", "de", 2, "detox_cos_en") > 0.99
    assert abs(_value(t, "aligned", "zh", 2, "detox_cos_en")) < 0.1
    assert abs(_value(t, "base", "en", 2, "detox_cos_en")) < 0.1  # base: detox orthogonal to the safety direction
    assert _value(t, "aligned", "en", 2, "detox_mean_norm") == pytest.approx(3.0, rel=0.02)
    assert _value(t, "aligned", "en", 2, "detox_proj_en") == pytest.approx(3.0, rel=0.02)
    assert _value(t, "aligned", "en", 2, "detox_consistency") > 0.95
    assert _value(t, "aligned", "de", 2, "detox_cos_own") < 0.1  # de's own safety direction is another axis
    shift = alignment_shift(t, "base", "aligned")
    cos = shift.filter((pl.col("metric") == "detox_cos_en") & (pl.col("lang") == "de") & (pl.col("layer") == 2))
    assert cos["shift"][0] > 0.9


def test_detox_displacement_bad_input():
    store = DetoxStore(drop_english_safety=True, lone_toxic_in_de=True)
    t = detox_displacement(store.detox, store.safety, ["aligned"], [1], options=FAST, progress=False)
    cos_en = t.filter(pl.col("metric") == "detox_cos_en")
    assert set(cos_en["status"]) == {"skipped"}
    assert all("no English ('en') rows in the safety set" in m for m in cos_en["message"])
    de = t.filter((pl.col("lang") == "de") & (pl.col("metric") == "detox_mean_norm")).row(0, named=True)
    assert de["status"] == "degraded" and de["n_pos"] == 37 and "3 sentences without their pair" in de["message"]
    assert t.filter((pl.col("lang") == "zh") & (pl.col("metric") == "detox_mean_norm"))["status"][0] == "ok"


# ------------------------------------------------------------------------------------------- figures and report
def test_figures_and_report(tmp_path, clean_table):
    shift = alignment_shift(clean_table, "base", "aligned")
    points = pca_scatter_points(SyntheticStore(), ["base", "aligned"], 3, FAST, max_points_per_class=40)
    assert points.height == 2 * len(LANGS) * 80
    en = points.filter((pl.col("model") == "aligned") & (pl.col("lang") == "en"))
    assert en.filter(pl.col("label") == 1)["pc1"].mean() > en.filter(pl.col("label") == 0)["pc1"].mean()
    # a few panels only: rendering dominates the time of this test
    scatter = plot_pca_scatter(points.filter(pl.col("lang") != "zh"), tmp_path, models=["base", "aligned"])
    curves = plot_layer_curves(clean_table, tmp_path, metrics=["bhattacharyya", "between_var_ratio"])
    heat = plot_shift_heatmap(shift, tmp_path, metrics=["silhouette_cosine", "probe_accuracy"])
    assert [p.name for p in scatter] == ["scatter_en_layer3.png", "scatter_de_layer3.png"]
    assert [p.name for p in curves] == ["curves_base.png", "curves_aligned.png"]
    for p in scatter + curves + heat:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    report = write_separation_report(
        tmp_path,
        clean_table,
        shift=shift,
        figures={"PCA scatter": scatter, "Layer curves": curves, "Shift": heat},
        notes=["synthetic store"],
    )
    text = report.read_text()
    assert "![scatter_en_layer3](scatter_en_layer3.png)" in text and "![shift_heatmap](shift_heatmap.png)" in text
    assert "| en | 3 |" in text and "×en" in text
    assert "None: every cell was computed on complete data." in text
    best = best_layers(clean_table)
    en_best = best.filter(
        (pl.col("model") == "aligned") & (pl.col("metric") == "between_var_ratio") & (pl.col("lang") == "en")
    ).row(0, named=True)
    assert en_best["layer"] == 3 and en_best["ratio_en"] == 1.0
