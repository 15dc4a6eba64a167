"""Concept vectors, recognition, consistency, transfer and the streaming driver, on synthetic activations with
planted structure (known directions per language, known best layer, known asymmetry)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl
import pytest
from scipy import stats

from raysafe.concepts import vectors as C
from raysafe.concepts.tables import (
    ConceptOptions,
    analyse_concepts,
    select_concept_vectors,
    transfer_max,
)
from raysafe.errors import ConfigError, DataError, ModelError

D = 16


def orthonormal(k: int, d: int = D, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:, :k].T


class SyntheticStore:
    """Activations of concept pairs: negative side = isotropic noise, positive side = negative side +
    ``strength[layer] * direction[concept][lang]`` + noise. ``noise_cov[lang]`` (optional) replaces the isotropic
    noise of the pair differences. ``read_layer(model, layer)`` has the activation store's signature."""

    def __init__(
        self,
        directions: Mapping[str, Mapping[str, np.ndarray]],
        strength: Mapping[int, float],
        *,
        n_train: int = 60,
        n_test: int = 60,
        noise: float = 0.3,
        seed: int = 0,
        shuffle: bool = False,
        noise_cov: Mapping[str, np.ndarray] | None = None,
        sizes: Mapping[tuple[str, str], int] | None = None,
    ):
        rng = np.random.default_rng(seed)

        self.X = {}
        meta = []
        for concept, per_lang in directions.items():
            for lang in per_lang:
                n = (sizes or {}).get((concept, lang), n_train + n_test)
                for i in range(n):
                    split = "train" if i < min(n_train, n * n_train // (n_train + n_test)) else "test"
                    gid = f"{concept}-{i}"
                    meta.append((gid, concept, lang, split, 1))
                    meta.append((gid, concept, lang, split, 0))
        self.meta = pl.DataFrame(meta, schema=["group_id", "concept", "lang", "split", "label"], orient="row")
        self.meta = (
            self.meta.with_columns(pl.Series("label", self.meta["label"], dtype=pl.Int64))
            .with_row_index("row_id")
            .with_columns(pl.col("row_id").cast(pl.Int64))
        )
        n_rows = self.meta.height
        base = rng.normal(size=(n_rows // 2, D))
        for layer, s in strength.items():
            X = np.empty((n_rows, D), dtype=np.float32)
            k = 0
            for concept, per_lang in directions.items():
                for lang, u in per_lang.items():
                    n = (sizes or {}).get((concept, lang), n_train + n_test)
                    for _ in range(n):
                        neg = base[k // 2] + layer * 0.01
                        if noise_cov is not None and lang in noise_cov:
                            eps = rng.multivariate_normal(np.zeros(D), noise_cov[lang])
                        else:
                            eps = rng.normal(scale=noise, size=D)
                        pos = neg + s * u + eps
                        if shuffle and rng.random() < 0.5:
                            pos, neg = neg, pos
                        X[k], X[k + 1] = pos, neg
                        k += 2
            self.X[layer] = X
        self.reads: list[int] = []

    def read_layer(self, model: str, layer: int) -> tuple[pl.DataFrame, np.ndarray]:
        if layer not in self.X:
            raise ModelError(f"layer {layer} not stored", where=f"model {model}")
        self.reads.append(layer)
        return self.meta, self.X[layer]


LANGS = ["en", "de", "sw", "am"]
STRENGTH = {1: 0.3, 2: 2.0, 3: 1.0}


@pytest.fixture(scope="module")
def planted():
    dirs = orthonormal(len(LANGS), seed=1)
    directions = {"toxicity": dict(zip(LANGS, dirs))}
    store = SyntheticStore(directions, STRENGTH)
    tables = analyse_concepts(store.read_layer, "m", [1, 2, 3], ConceptOptions(high_resource=("en", "de")))
    return store, directions, tables


# ------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("method", ["mean_diff", "pca", "logistic"])
def test_sign_is_fixed_so_positive_sides_project_higher(method):
    rng = np.random.default_rng(3)
    u = orthonormal(1, seed=3)[0]
    neg = rng.normal(size=(50, D))
    pos = neg + 1.5 * u + rng.normal(scale=0.3, size=(50, D))
    for p, n in ((pos, neg), (neg, pos)):
        cv = C.concept_vector(p, n, method)
        assert (C.pair_margins(cv.raw, p, n)).mean() > 0
        assert np.linalg.norm(cv.unit) == pytest.approx(1.0)
        assert cv.norm == pytest.approx(np.linalg.norm(cv.raw))
        assert abs(cv.unit @ u) > (0.8 if method == "logistic" else 0.95)


def test_mean_diff_is_difference_of_class_means():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(7, D)), rng.normal(size=(7, D))
    np.testing.assert_allclose(C.mean_diff_direction(pos, neg), pos.mean(0) - neg.mean(0))


def test_pair_accuracy_counts_ties_as_wrong():
    v = np.array([1.0, 0.0])
    pos = np.array([[1.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    neg = np.zeros((3, 2))
    assert C.pair_accuracy(v, pos, neg) == pytest.approx(1 / 3)


def test_transfer_delta_has_zero_diagonal_and_compares_with_own_vector():
    acc = np.array([[0.9, 0.6], [0.7, 0.8]])
    delta = C.transfer_delta(acc)
    np.testing.assert_array_equal(np.diag(delta), 0.0)
    assert delta[0, 1] == pytest.approx(0.6 - 0.8) and delta[1, 0] == pytest.approx(0.7 - 0.9)


def test_correlate_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    r = C.correlate(x, y)
    assert r["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert r["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert np.isnan(C.correlate(x[:2], y[:2])["pearson_r"])


def test_best_index_breaks_ties():
    assert C.best_index(np.array([0.5, 0.9, 0.9]), np.array([0.0, 0.1, 0.3])) == 2
    assert C.best_index(np.array([np.nan, 0.2])) == 1
    assert C.best_index(np.array([np.nan])) == -1


# ------------------------------------------------------------------------------------------------- driver


def test_streams_one_layer_at_a_time(planted):
    store, _, _ = planted
    assert store.reads == [1, 2, 3]


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_planted_direction_per_language_is_recovered(method):
    dirs = orthonormal(len(LANGS), seed=1)
    store = SyntheticStore({"toxicity": dict(zip(LANGS, dirs))}, {2: 2.0})
    tables = analyse_concepts(store.read_layer, "m", [2], ConceptOptions(method=method))
    for lang, u in zip(LANGS, dirs):
        vec = select_concept_vectors(tables["vectors"], "toxicity", lang, [2], kind="unit")[2]
        assert float(vec @ u) >= 0.99, lang
        raw = select_concept_vectors(tables["vectors"], "toxicity", lang, [2], kind="raw")[2]
        np.testing.assert_allclose(raw / np.linalg.norm(raw), vec, atol=1e-6)


def test_recognition_selects_the_strong_layer_on_train_data(planted):
    _, _, t = planted
    rec = t["recognition"]
    assert rec.height == len(LANGS) * 3
    best = t["recognition_best"]
    assert set(best.columns) >= {
        "layer_selected_on_train",
        "test_acc_at_train_selected_layer",
        "layer_selected_on_test",
        "test_acc_at_test_selected_layer",
    }
    assert best["layer_selected_on_train"].to_list() == [2] * len(LANGS)
    assert (best["test_acc_at_train_selected_layer"] > 0.95).all()
    assert t["concept_layers"]["layer_selected_on_train"].to_list() == [2]
    weak = rec.filter(pl.col("layer") == 1)["test_acc"]
    assert (weak < rec.filter(pl.col("layer") == 2)["test_acc"].min()).all()


def test_shuffled_labels_give_chance_accuracy():
    dirs = orthonormal(len(LANGS), seed=2)
    store = SyntheticStore(
        {"toxicity": dict(zip(LANGS, dirs)), "fairness": dict(zip(LANGS, dirs[::-1]))},
        {1: 2.0, 2: 2.0},
        n_train=80,
        n_test=150,
        shuffle=True,
        seed=5,
    )
    t = analyse_concepts(store.read_layer, "m", [1, 2], ConceptOptions())
    at_train_layer = t["recognition_best"]["test_acc_at_train_selected_layer"]
    assert abs(at_train_layer.mean() - 0.5) < 0.05
    assert t["recognition"]["test_acc"].is_between(0.35, 0.65).all()
    # choosing the layer on the test data can only look better
    best = t["recognition_best"]
    assert (best["test_acc_at_test_selected_layer"] >= best["test_acc_at_train_selected_layer"]).all()


def test_consistency_tables(planted):
    _, _, t = planted
    cons = t["consistency"]
    assert cons.height == 3 * 6  # 3 layers x C(4, 2) pairs
    assert (cons["lang_a"] < cons["lang_b"]).all()
    assert cons.filter(pl.col("layer") == 2)["cosine"].abs().max() < 0.2  # planted orthogonal directions
    summary = t["consistency_summary"]
    assert set(summary["concept"]) == {"toxicity", "mean"}
    curve = t["consistency_curve"]
    assert curve.filter(pl.col("concept") == "mean")["layer"].to_list() == [1, 2, 3]


def test_consistency_summary_max_over_layers_and_selected_layer():
    from raysafe.concepts.tables import consistency_summary

    cons = pl.DataFrame(
        {
            "model": ["m"] * 6,
            "concept": ["c"] * 3 + ["k"] * 3,
            "layer": [3, 1, 2] * 2,
            "lang_a": ["de"] * 6,
            "lang_b": ["en"] * 6,
            "cosine": [0.1, 0.5, 0.9, 0.3, 0.7, 0.2],
        }
    )
    s = consistency_summary(cons, {"c": 1, "k": 3})
    rows = {r["concept"]: r for r in s.iter_rows(named=True)}
    assert (rows["c"]["max_cosine"], rows["c"]["layer_of_max"], rows["c"]["cosine_at_concept_layer"]) == (0.9, 2, 0.5)
    assert (rows["k"]["max_cosine"], rows["k"]["layer_of_max"], rows["k"]["cosine_at_concept_layer"]) == (0.7, 1, 0.3)
    assert rows["mean"]["max_cosine"] == pytest.approx(0.8)
    assert rows["mean"]["cosine_at_concept_layer"] == pytest.approx(0.4)


def test_shared_direction_gives_high_consistency():
    u, w = orthonormal(2, seed=4)
    store = SyntheticStore({"toxicity": {"en": u, "de": u, "sw": w}}, {1: 2.0, 2: 1.5})
    t = analyse_concepts(store.read_layer, "m", [1, 2], ConceptOptions())
    s = {
        (a, b): c
        for a, b, c in t["consistency_summary"]
        .filter(pl.col("concept") == "toxicity")
        .select("lang_a", "lang_b", "max_cosine")
        .iter_rows()
    }
    assert s[("de", "en")] > 0.98
    assert abs(s[("en", "sw")]) < 0.3


def test_transfer_matrix_has_zero_diagonal(planted):
    _, _, t = planted
    tr = t["transfer"]
    assert tr.height == 3 * len(LANGS) ** 2
    assert (tr.filter(pl.col("source_lang") == pl.col("target_lang"))["delta"] == 0.0).all()
    best = t["transfer_best"]
    assert (best.filter(pl.col("source_lang") == pl.col("target_lang"))["delta"] == 0.0).all()
    # orthogonal planted directions do not transfer: off-diagonal acc near chance, delta strongly negative
    off = best.filter((pl.col("source_lang") != pl.col("target_lang")) & (pl.col("concept") == "toxicity"))
    assert (off["delta"] < -0.25).all()


def test_transfer_max_is_the_papers_max_over_layers_matrix():
    """acc(A→B) and acc(B→B) are each maximised over layers, then subtracted; "mean" averages over concepts
    (Xu et al., transferability_analysis.py draw_acc_heatmap). Hand-built table with known answers."""
    rows = []
    acc = {  # (concept, layer, source, target) -> acc
        ("c1", 1, "en", "en"): 0.9, ("c1", 2, "en", "en"): 0.8, ("c1", 1, "sw", "sw"): 0.6, ("c1", 2, "sw", "sw"): 0.7,
        ("c1", 1, "en", "sw"): 0.5, ("c1", 2, "en", "sw"): 0.75, ("c1", 1, "sw", "en"): 0.6, ("c1", 2, "sw", "en"): 0.55,
        ("c2", 1, "en", "en"): 1.0, ("c2", 2, "en", "en"): 1.0, ("c2", 1, "sw", "sw"): 0.5, ("c2", 2, "sw", "sw"): 0.9,
        ("c2", 1, "en", "sw"): 0.8, ("c2", 2, "en", "sw"): 0.8, ("c2", 1, "sw", "en"): 0.7, ("c2", 2, "sw", "en"): 0.4,
    }  # fmt: skip
    for (c, layer, a, b), v in acc.items():
        own = acc[(c, layer, b, b)]
        rows.append(
            {"model": "m", "concept": c, "layer": layer, "source_lang": a, "target_lang": b, "acc": v,
             "acc_target_own": own, "delta": v - own}
        )  # fmt: skip
    t = transfer_max(pl.DataFrame(rows))
    got = {(r["concept"], r["source_lang"], r["target_lang"]): r for r in t.iter_rows(named=True)}
    assert got[("c1", "en", "sw")]["acc"] == 0.75 and got[("c1", "en", "sw")]["layer"] == 2
    assert got[("c1", "en", "sw")]["delta"] == pytest.approx(0.75 - 0.7)
    assert got[("c1", "sw", "en")]["delta"] == pytest.approx(0.6 - 0.9) and got[("c1", "sw", "en")]["layer"] == 1
    assert got[("c2", "en", "sw")]["layer"] == 1  # ties: the lower layer
    assert got[("mean", "en", "sw")]["delta"] == pytest.approx((0.75 + 0.8) / 2 - (0.7 + 0.9) / 2)
    assert got[("mean", "sw", "en")]["delta"] == pytest.approx((0.6 + 0.7) / 2 - (0.9 + 1.0) / 2)
    assert all(got[(c, x, x)]["delta"] == 0.0 for c in ("c1", "c2", "mean") for x in ("en", "sw"))


def test_planted_asymmetric_transfer_shows_with_the_right_sign():
    """High-resource pairs differ along e1 only; low-resource pairs differ along e1 and e2, and the high-resource
    languages carry heavy nuisance variance along e2. The low-resource vectors (e1 + e2) then fail on high-resource
    pairs while the high-resource vector (e1) works on low-resource pairs."""
    e1, e2 = orthonormal(2, seed=6)
    heavy = np.eye(D) * 0.05 + 9.0 * np.outer(e2, e2)
    light = np.eye(D) * 0.05
    directions = {"toxicity": {"en": e1, "de": e1, "sw": e1 + e2, "am": e1 + e2}}
    store = SyntheticStore(
        directions,
        {1: 1.0},
        n_train=80,
        n_test=120,
        seed=7,
        noise_cov={"en": heavy, "de": heavy, "sw": light, "am": light},
    )
    t = analyse_concepts(store.read_layer, "m", [1], ConceptOptions(high_resource=("en", "de")))
    asym = t["transfer_asymmetry"].filter(pl.col("concept") == "toxicity").row(0, named=True)
    assert asym["n_high_to_low"] == 4 and asym["n_low_to_high"] == 4
    assert asym["mean_high_to_low"] > -0.05
    assert asym["mean_low_to_high"] < -0.1
    assert asym["high_minus_low"] > 0.1


def test_distance_correlation_recovers_planted_relation():
    """Concept vectors whose pairwise cosines equal 1 - syntactic distance correlate perfectly with it."""
    from raysafe.concepts.language_distance import language_distances

    langs = ["en", "de", "fr", "es", "ru", "ja", "hi"]
    dist = language_distances(langs, ("syntactic",)).table
    S = np.eye(len(langs))
    pos = {lang: i for i, lang in enumerate(langs)}
    for a, b, d in dist.select("lang_a", "lang_b", "distance").iter_rows():
        S[pos[a], pos[b]] = S[pos[b], pos[a]] = 1 - d
    w, V = np.linalg.eigh(S)
    assert w.min() > 0  # a valid Gram matrix
    vecs = (V * np.sqrt(w)) @ orthonormal(len(langs), seed=8)
    store = SyntheticStore({"toxicity": dict(zip(langs, vecs))}, {1: 3.0}, n_train=400, n_test=20, noise=0.05)
    t = analyse_concepts(
        store.read_layer,
        "m",
        [1],
        ConceptOptions(distance_types=("syntactic", "genetic"), high_resource=("en", "de", "fr")),
    )
    corr = t["distance_correlation"]
    row = corr.filter(
        (pl.col("concept") == "toxicity") & (pl.col("distance_type") == "syntactic") & (pl.col("subset") == "all")
    ).row(0, named=True)
    assert row["n"] == 21
    assert row["pearson_r"] > 0.99
    subsets = corr.filter((pl.col("concept") == "toxicity") & (pl.col("distance_type") == "syntactic"))
    assert dict(zip(subsets["subset"], subsets["n"])) == {"all": 21, "involves_high": 15, "low_low": 6}
    pairs = t["distance_pairs"]
    assert set(pairs["pair_group"]) == {"high_high", "high_low", "low_low"}
    np.testing.assert_allclose(pairs["relatedness"], 1 - pairs["distance"])
    assert set(corr["concept"]) == {"toxicity", "mean"}


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_cells_layers_and_languages_are_reported_and_the_rest_completes():
    dirs = orthonormal(4, seed=9)
    directions = {
        "toxicity": {"en": dirs[0], "de": dirs[1], "xx": dirs[2], "sw": dirs[3]},
        "fairness": {"en": dirs[0], "de": dirs[1]},
    }
    store = SyntheticStore(directions, {1: 2.0, 2: 2.0}, sizes={("toxicity", "sw"): 6, ("fairness", "de"): 6})
    t = analyse_concepts(store.read_layer, "m", [1, 2, 7, -1, 40], ConceptOptions(min_pairs=5, num_layers=24))
    status = t["status"]
    msgs = "\n".join(status["message"])
    assert "'sw' has too few pairs" in msgs and "'de' has too few pairs" in msgs
    assert "layer 7 of model 'm' could not be read" in msgs
    assert "layer -1 is out of range" in msgs and "layer 40 is out of range" in msgs
    assert "xx" in status.filter(pl.col("scope") == "uriel")["lang"].to_list()
    assert "concept 'fairness' has 1 usable language(s)" in msgs
    skipped = t["vectors_summary"].filter(pl.col("status") == "skipped")
    assert set(skipped.select("concept", "lang").rows()) == {("toxicity", "sw"), ("fairness", "de")}
    # the rest completed: en, de, xx for toxicity at layers 1 and 2; en for fairness
    rec = t["recognition"]
    assert set(rec.filter(pl.col("concept") == "toxicity")["lang"]) == {"en", "de", "xx"}
    assert sorted(set(rec["layer"])) == [1, 2]
    assert set(rec.filter(pl.col("concept") == "fairness")["lang"]) == {"en"}
    assert t["consistency"].filter(pl.col("concept") == "toxicity").height == 2 * 3
    # xx is in the consistency table but has no URIEL distance
    assert "xx" not in set(t["distance_pairs"]["lang_a"]) | set(t["distance_pairs"]["lang_b"])


def test_incomplete_pairs_are_dropped_with_a_warning():
    store = SyntheticStore({"toxicity": dict(zip(["en", "de"], orthonormal(2)))}, {1: 2.0})
    drop = store.meta.filter((pl.col("lang") == "en") & (pl.col("group_id") == "toxicity-3") & (pl.col("label") == 0))[
        "row_id"
    ][0]
    keep = (store.meta["row_id"] != drop).to_numpy()
    meta, X = store.meta.filter(pl.Series(keep)), store.X[1][keep]
    t = analyse_concepts(lambda m, L: (meta, X), "m", [1], ConceptOptions())
    warn = t["status"].filter(pl.col("status") == "warning")
    assert any("1 pair(s) of concept 'toxicity' in language 'en' dropped" in m for m in warn["message"])
    assert t["recognition"].filter(pl.col("lang") == "en")["n_train"][0] == 59


def test_contract_violations_raise_data_error():
    store = SyntheticStore({"toxicity": dict(zip(["en", "de"], orthonormal(2)))}, {1: 2.0, 2: 2.0})
    with pytest.raises(DataError, match="lacks column"):
        analyse_concepts(lambda m, L: (store.meta.drop("split"), store.X[1]), "m", [1])
    with pytest.raises(DataError, match="label must be 0 or 1"):
        analyse_concepts(lambda m, L: (store.meta.with_columns(label=pl.col("label") * 2), store.X[1]), "m", [1])
    with pytest.raises(DataError, match="split must be"):
        analyse_concepts(lambda m, L: (store.meta.with_columns(split=pl.lit("dev")), store.X[1]), "m", [1])
    with pytest.raises(DataError, match="shape"):
        analyse_concepts(lambda m, L: (store.meta, store.X[1][:-1]), "m", [1])

    def reordered(model: str, layer: int):
        meta = store.meta if layer == 1 else store.meta.reverse()
        return meta, store.X[layer]

    with pytest.raises(DataError, match="same order"):
        analyse_concepts(reordered, "m", [1, 2])


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        ConceptOptions(method="svm")
    with pytest.raises(ConfigError):
        ConceptOptions(distance_types=("lexical",))
    with pytest.raises(ConfigError):
        ConceptOptions(min_pairs=0)
    with pytest.raises(ConfigError):
        analyse_concepts(lambda m, L: None, "m", [])


def test_high_resource_languages_are_configurable_per_model():
    opts = ConceptOptions(high_resource_by_model={"gemma": ("en",)})
    assert opts.high_resource_for("gemma") == {"en"}
    assert "zh" in opts.high_resource_for("llama")


def test_languages_excluded_per_model_are_left_out_and_reported():
    """As the authors' llama_exclude / bloomz_exclude: an excluded language is in no table of that model only."""
    store = SyntheticStore({"toxicity": dict(zip(LANGS, orthonormal(len(LANGS))))}, {1: 2.0})
    opts = ConceptOptions(distance_types=("syntactic",), exclude_by_model={"llama": ("sw", "am")})
    t = analyse_concepts(store.read_layer, "llama", [1], opts)
    assert set(t["recognition"]["lang"]) == {"en", "de"}
    assert set(t["transfer"]["source_lang"]) | set(t["transfer"]["target_lang"]) == {"en", "de"}
    status = t["status"].filter(pl.col("message").str.contains("excluded for this model"))
    assert set(status["lang"]) == {"sw", "am"}
    other = analyse_concepts(store.read_layer, "bloomz", [1], opts)
    assert set(other["recognition"]["lang"]) == set(LANGS)


def test_select_concept_vectors_names_missing_layers(planted):
    _, _, t = planted
    with pytest.raises(DataError, match="layer"):
        select_concept_vectors(t["vectors"], "toxicity", "en", [2, 9])
    assert set(select_concept_vectors(t["vectors"], "toxicity", "en")) == {1, 2, 3}


# ------------------------------------------------------------------------------------------ figures, report


def test_report_writes_tables_figures_and_markdown(tmp_path):
    from PIL import Image

    from raysafe.concepts.report import write_concept_report

    langs = ["en", "de", "sw"]
    store = SyntheticStore({"toxicity": dict(zip(langs, orthonormal(3, seed=11)))}, {1: 0.5, 2: 2.0})
    tables = analyse_concepts(
        store.read_layer, "tiny", [1, 2], ConceptOptions(distance_types=("syntactic",), high_resource=("en",))
    )
    steer = pl.DataFrame(
        {
            "lang": ["de", "de", "sw", "sw"],
            "layers": ["2"] * 4,
            "alpha": [0.0, 1.0] * 2,
            "projection_shift": [0.0, 1.0, 0.0, 0.5],
            "behaviour_score": [0.1, 0.2, 0.0, 0.1],
            "perplexity": [9.0, 9.5, 12.0, 12.4],
        }
    )
    report = write_concept_report(tables, tmp_path, steering=steer)
    text = report.read_text()
    figures = sorted((tmp_path / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {
        "recognition_toxicity.png",
        "similarity_toxicity.png",
        "similarity_mean.png",
        "consistency_curve.png",
        "similarity_vs_syntactic_mean.png",
        "transfer_toxicity.png",
        "transfer_mean.png",
        "steering_layers_2.png",
    } <= names
    for p in figures:
        assert f"(figures/{p.name})" in text
        assert Image.open(p).info["dpi"][0] == pytest.approx(150, abs=0.1)
    for name, df in tables.items():
        back = pl.read_parquet(tmp_path / "tables" / f"{name}.parquet")
        assert back.shape == df.shape, name
    assert "test_acc_at_train_selected_layer" in text and "## Transfer" in text


def test_without_uriel_data_the_rest_of_the_analysis_completes(monkeypatch, tmp_path):
    from raysafe.concepts import language_distance as LD

    monkeypatch.setenv(LD.DATA_ENV, str(tmp_path))  # a directory without lang2vec's files
    LD._load_feature_table.cache_clear()
    LD._geo_anchors.cache_clear()
    try:
        store = SyntheticStore({"toxicity": dict(zip(["en", "de", "sw"], orthonormal(3, seed=4)))}, {1: 2.0})
        t = analyse_concepts(store.read_layer, "m", [1], ConceptOptions())
    finally:
        LD._load_feature_table.cache_clear()
        LD._geo_anchors.cache_clear()
    msgs = "\n".join(t["status"]["message"])
    assert "no URIEL distances: the URIEL data files" in msgs and str(tmp_path) in msgs
    assert t["language_distance"].height == 0 and t["distance_correlation"].height == 0
    assert set(t["recognition"]["lang"]) == {"en", "de", "sw"} and t["transfer_best"].height > 0
