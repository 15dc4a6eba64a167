"""The movable consistency measures: closed forms, independent implementations, and the check that they move where
the raw-state measures saturate (a shared direction as in real LM hidden states)."""

import numpy as np
import pytest

from raysafe.bootstrap import bootstrap_indices, interval, paired_rate_differences
from raysafe.consistency import (
    centre,
    item_measures,
    linear_cka,
    measure_rows,
    paired_difference_rows,
    rank1_energy_per_item,
    retrieval_per_query,
)
from raysafe.errors import DataError

LANGS = ["ar", "en", "ru", "zh"]


def anisotropic_states(n=60, m=4, d=32, shared=30.0, aligned=True, seed=0):
    """States = a large shared direction + an item signal common to its languages (if aligned) + language noise."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d) * shared
    item = rng.normal(size=(n, 1, d))
    if not aligned:  # each language sees a different item's signal: no cross-lingual identity
        item = np.stack([item[rng.permutation(n), 0] for _ in range(m)], axis=1)
    return common + item + 0.3 * rng.normal(size=(n, m, d))


def test_cka_matches_feature_space_formula_and_invariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 10)), rng.normal(size=(40, 7))
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y, debiased=False) == pytest.approx(feature_form, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    for debiased in (True, False):
        assert linear_cka(x, 3.0 * x @ q + 5.0, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, rng.normal(size=(40, 10))) < 0.3


def test_debiased_cka_against_a_loop_and_its_small_n_behaviour():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(9, 3))

    def hsic_u(a, b):  # Song et al. 2012 eq. 5, written with explicit sums over distinct index tuples
        k, l_ = a @ a.T, b @ b.T
        n = len(a)
        idx = range(n)
        t1 = sum(k[i, j] * l_[i, j] for i in idx for j in idx if i != j) / (n * (n - 1))
        t2 = sum(k[i, j] * l_[q, r] for i in idx for j in idx for q in idx for r in idx if len({i, j, q, r}) == 4)
        t3 = sum(k[i, j] * l_[i, q] for i in idx for j in idx for q in idx if len({i, j, q}) == 3)
        return t1 + t2 / (n * (n - 1) * (n - 2) * (n - 3)) - 2 * t3 / (n * (n - 1) * (n - 2))

    expected = hsic_u(x, y) / np.sqrt(hsic_u(x, x) * hsic_u(y, y))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-9)
    # unrelated representations: the plain estimator reads far above 0 at small n, the debiased one does not
    plain = [linear_cka(rng.normal(size=(30, 20)), rng.normal(size=(30, 20)), debiased=False) for _ in range(20)]
    debiased = [linear_cka(rng.normal(size=(30, 20)), rng.normal(size=(30, 20))) for _ in range(20)]
    assert np.mean(plain) > 0.4 and abs(np.mean(debiased)) < 0.05


def test_rank1_energy_against_svd_and_bounds():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(5, 4, 8))
    u = s / np.linalg.norm(s, axis=-1, keepdims=True)
    expected = [np.linalg.svd(u[i], compute_uv=False)[0] ** 2 / 4 for i in range(5)]  # Σσ² = m for unit rows
    assert np.allclose(rank1_energy_per_item(s), expected, atol=1e-12)
    collinear = np.repeat(rng.normal(size=(3, 1, 8)), 4, axis=1)
    assert np.allclose(rank1_energy_per_item(collinear), 1.0)
    assert np.allclose(rank1_energy_per_item(np.tile(np.eye(4, 8), (2, 1, 1))), 0.25)


def test_retrieval_against_brute_force():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(12, 2, 6))
    hit, rr = retrieval_per_query(s, 0, 1)
    for i in range(12):
        q = s[i, 0] / np.linalg.norm(s[i, 0])
        scores = [q @ (s[j, 1] / np.linalg.norm(s[j, 1])) for j in range(12)]
        rank = 1 + sum(scores[j] >= scores[i] for j in range(12) if j != i)
        assert rr[i] == pytest.approx(1 / rank) and hit[i] == (rank == 1)
    same = np.repeat(rng.normal(size=(12, 1, 6)), 2, axis=1)
    hit, rr = retrieval_per_query(same, 0, 1)
    assert hit.mean() == 1.0 and rr.mean() == 1.0


def test_movable_measures_move_where_raw_cosine_saturates():
    aligned, shuffled = anisotropic_states(aligned=True), anisotropic_states(aligned=False)
    ma, ms = item_measures(aligned, LANGS, "en"), item_measures(shuffled, LANGS, "en")
    # the saturated measure: ~1 for both
    assert ma["raw_cosine"]["all"].mean() > 0.98 and ms["raw_cosine"]["all"].mean() > 0.98
    assert abs(ma["raw_cosine"]["all"].mean() - ms["raw_cosine"]["all"].mean()) < 0.01
    # the movable ones separate the two
    for lang in ("ar", "ru", "zh"):
        assert ma["retrieval_p1"][lang].mean() > 0.9 > 0.2 > ms["retrieval_p1"][lang].mean()
        assert ma["centred_cosine"][lang].mean() > 0.8 > 0.2 > ms["centred_cosine"][lang].mean()
    assert ma["centred_rank1"]["all"].mean() > ms["centred_rank1"]["all"].mean() + 0.3
    rows = {(r["measure"], r["lang"]): r for r in measure_rows(aligned, LANGS, "en", resamples=200)}
    assert rows[("cka", "ru")]["value"] > 0.8
    assert rows[("cka", "ru")]["ci_low"] <= rows[("cka", "ru")]["value"] <= rows[("cka", "ru")]["ci_high"]


def test_paired_difference_excludes_zero_only_for_a_real_difference():
    aligned, shuffled = anisotropic_states(aligned=True), anisotropic_states(aligned=False)
    diff = paired_difference_rows(aligned, shuffled, LANGS, "en", resamples=300)
    by = {(r["measure"], r["lang"]): r for r in diff}
    assert by[("retrieval_p1", "zh")]["excludes_zero"] and by[("retrieval_p1", "zh")]["difference"] > 0.5
    assert by[("cka", "ar")]["excludes_zero"]
    same = paired_difference_rows(aligned, aligned.copy(), LANGS, "en", resamples=100)
    assert all(r["difference"] == 0 and not r["excludes_zero"] for r in same)


def test_bootstrap_interval_covers_the_mean_and_is_reproducible():
    rng = np.random.default_rng(4)
    v = rng.normal(0.3, 1.0, size=400)
    idx = bootstrap_indices(400, 500, seed=7)
    lo, hi = interval(v[idx].mean(1))
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert np.array_equal(idx, bootstrap_indices(400, 500, seed=7))


def test_centre_removes_the_common_mean_and_anchor_is_required():
    s = anisotropic_states(n=10)
    assert np.allclose(centre(s).reshape(-1, s.shape[-1]).mean(0), 0, atol=1e-12)
    with pytest.raises(DataError, match="anchor"):
        item_measures(s, LANGS, "fr")


def test_paired_rate_differences_against_a_loop():
    rng = np.random.default_rng(6)
    a = (rng.random((3, 40)) < 0.8).astype(float)
    b = (rng.random((3, 40)) < 0.3).astype(float)
    a[1, :5] = np.nan  # a language without outcomes for some groups
    rows = paired_rate_differences(a, b, ["en", "ru", "zh"], resamples=300, seed=2)
    idx = bootstrap_indices(40, 300, seed=2)
    for i, r in enumerate(rows):
        reps = [np.nanmean(a[i, j]) - np.nanmean(b[i, j]) for j in idx]
        assert r["difference"] == pytest.approx(np.nanmean(a[i]) - np.nanmean(b[i]))
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(interval(np.array(reps)))
        assert r["excludes_zero"]
    same = paired_rate_differences(a, a, ["en", "ru", "zh"], resamples=50)
    assert all(r["difference"] == 0 and not r["excludes_zero"] for r in same)
