"""Known-answer tests of the pure separation metrics (raysafe.separation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import PredefinedSplit, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from raysafe.separation.metrics import (
    SEPARATION_METRICS,
    between_class_variance_ratio,
    bhattacharyya_distance,
    bootstrap_interval,
    cell_metrics,
    centroid_distance,
    fit_pca,
    index_counts,
    moment_metrics,
    probe_cv_accuracy,
    silhouette,
    stratified_bootstrap,
    stratified_folds,
    weighted_between_ratio,
    weighted_class_moments,
    wilson_interval,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tensors here are tiny: one intra-op thread avoids thread hand-off latency on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _two_classes(n0: int, n1: int, d: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated Gaussian noise, class 1 shifted by ``shift`` along a random unit direction."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / math.sqrt(d)
    X = rng.normal(size=(n0 + n1, d)) @ (A + np.eye(d))
    y = np.r_[np.zeros(n0, dtype=int), np.ones(n1, dtype=int)]
    u = rng.normal(size=d)
    X[y == 1] += shift * u / np.linalg.norm(u)
    return X, y


def _closed_form_bd(mu0, cov0, mu1, cov1) -> float:
    cov = (cov0 + cov1) / 2
    delta = mu1 - mu0
    maha = delta @ np.linalg.solve(cov, delta)
    _, ld = np.linalg.slogdet(cov)
    _, ld0 = np.linalg.slogdet(cov0)
    _, ld1 = np.linalg.slogdet(cov1)
    return maha / 8 + 0.5 * (ld - 0.5 * (ld0 + ld1))


# ------------------------------------------------------------------------------------------------ Bhattacharyya
@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", 0.0])
def test_bhattacharyya_matches_closed_form_at_5000_per_class(shrinkage):
    rng = np.random.default_rng(1)
    k = 6
    mu0 = np.zeros(k)
    mu1 = rng.normal(size=k) * 0.6
    B0 = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    B1 = rng.normal(size=(k, k)) * 0.3 + 1.3 * np.eye(k)
    cov0, cov1 = B0 @ B0.T, B1 @ B1.T
    truth = _closed_form_bd(mu0, cov0, mu1, cov1)
    n = 5000
    Z0 = rng.multivariate_normal(mu0, cov0, size=n)
    Z1 = rng.multivariate_normal(mu1, cov1, size=n)
    Z = torch.tensor(np.concatenate([Z0, Z1]))
    y = torch.tensor(np.r_[np.zeros(n), np.ones(n)].astype(int))
    est = bhattacharyya_distance(Z, y, shrinkage=shrinkage)
    assert truth > 0.2
    assert abs(est - truth) / truth < 0.02, (est, truth)


@pytest.mark.parametrize("seed,n0,n1,k", [(0, 200, 150, 4), (1, 40, 60, 10), (2, 500, 500, 2)])
def test_default_bhattacharyya_is_the_plain_closed_form_on_the_sample_moments(seed, n0, n1, k):
    """The default is the paper's plain closed form (no shrinkage) on each class's biased sample covariance, as a
    float64 numpy reference computes it; Ledoit-Wolf shrinkage gives another value (it is an option)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(k, k))
    Z0 = rng.normal(size=(n0, k)) @ A
    Z1 = rng.normal(size=(n1, k)) @ (A + 0.5 * rng.normal(size=(k, k))) + rng.normal(size=k)
    ref = _closed_form_bd(Z0.mean(0), np.cov(Z0.T, bias=True), Z1.mean(0), np.cov(Z1.T, bias=True))
    Z = torch.tensor(np.concatenate([Z0, Z1]))
    y = torch.tensor(np.r_[np.zeros(n0), np.ones(n1)].astype(int))
    assert bhattacharyya_distance(Z, y) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert cell_metrics(Z, y, bootstrap=0)["bhattacharyya"].value == pytest.approx(ref, rel=1e-10)
    assert bhattacharyya_distance(Z, y, "ledoit_wolf") != pytest.approx(ref, rel=1e-6)


def test_bhattacharyya_of_identical_gaussians_is_near_zero_and_grows_with_the_gap():
    X, y = _two_classes(3000, 3000, 5, 0.0)
    X2, _ = _two_classes(3000, 3000, 5, 2.0)
    near = bhattacharyya_distance(torch.tensor(X), torch.tensor(y))
    far = bhattacharyya_distance(torch.tensor(X2), torch.tensor(y))
    assert 0 <= near < 0.01
    assert far > 0.3


def test_weighted_moments_and_ledoit_wolf_intensity_match_numpy_and_sklearn_on_each_resample():
    X, _ = _two_classes(40, 0, 8, 0.0, seed=3)
    X = X + 50.0  # far from the origin: the expansion around the mean must stay exact
    idx = torch.randint(0, 40, (3, 40), generator=torch.Generator().manual_seed(4))
    W = torch.cat([torch.ones(1, 40, dtype=F64), index_counts(idx, 40)])
    mean, cov, alpha = weighted_class_moments(torch.tensor(X), W)
    for b in range(4):
        Xb = X if b == 0 else X[idx[b - 1].numpy()]
        np.testing.assert_allclose(mean[b].numpy(), Xb.mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov[b].numpy(), np.cov(Xb.T, bias=True), atol=1e-10)
        assert float(alpha[b]) == pytest.approx(ledoit_wolf_shrinkage(Xb), abs=1e-9)


def test_shrinkage_keeps_a_class_smaller_than_the_dimension_finite():
    X, y = _two_classes(4, 40, 10, 1.0)
    assert math.isfinite(bhattacharyya_distance(torch.tensor(X), torch.tensor(y), "ledoit_wolf"))
    assert math.isfinite(bhattacharyya_distance(torch.tensor(X), torch.tensor(y), 0.1))
    assert math.isnan(bhattacharyya_distance(torch.tensor(X), torch.tensor(y), 0.0))  # singular without shrinkage


# --------------------------------------------------------------------------------------------------- silhouette
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_matches_sklearn(metric):
    X, y = _two_classes(230, 170, 7, 1.5)
    ours = float(silhouette(torch.tensor(X), torch.tensor(y), metric, chunk_rows=64))
    assert ours == pytest.approx(silhouette_score(X, y, metric=metric), abs=1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_bootstrap_silhouette_equals_sklearn_on_each_resample(metric):
    X, y = _two_classes(60, 40, 4, 1.0)
    gen = torch.Generator().manual_seed(5)
    i0, i1 = stratified_bootstrap(60, 40, 4, gen)
    reps = silhouette(
        torch.tensor(X), torch.tensor(y), metric, W0=index_counts(i0, 60), W1=index_counts(i1, 40), chunk_rows=16
    )
    X0, X1 = X[y == 0], X[y == 1]
    for b in range(4):
        Xb = np.concatenate([X0[i0[b].numpy()], X1[i1[b].numpy()]])
        yb = np.r_[np.zeros(60), np.ones(40)]
        assert float(reps[b]) == pytest.approx(silhouette_score(Xb, yb, metric=metric), abs=1e-4)


# -------------------------------------------------------------------------------------------------------- PCA
@pytest.mark.parametrize("n,d,solver", [(500, 20, "covariance"), (30, 80, "gram"), (500, 20, "auto"), (30, 80, "auto")])
def test_pca_explained_variance_matches_sklearn(n, d, solver):
    X, _ = _two_classes(n, 0, d, 0.0, seed=7)
    X = X * np.linspace(3, 0.2, d)
    k = 5
    ref = PCA(k, svd_solver="full").fit(X)
    fit = fit_pca(torch.tensor(X), k, solver=solver, chunk_rows=64)
    np.testing.assert_allclose(fit.explained_variance.numpy(), ref.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(fit.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, atol=1e-6)
    Z = fit.transform(torch.tensor(X)).numpy()
    Zr = ref.transform(X)
    np.testing.assert_allclose(np.abs(Z), np.abs(Zr), atol=1e-8 * np.abs(Zr).max())  # same up to signs


def test_randomized_pca_is_close_to_exact_on_a_decaying_spectrum():
    X, _ = _two_classes(400, 0, 60, 0.0, seed=8)
    X = X * np.geomspace(10, 0.1, 60)
    ref = PCA(4, svd_solver="full").fit(X)
    fit = fit_pca(torch.tensor(X, dtype=torch.float32), 4, solver="randomized")
    np.testing.assert_allclose(fit.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-4)


def test_pca_keeps_fewer_components_when_items_are_few():
    X, _ = _two_classes(6, 0, 30, 0.0)
    assert fit_pca(torch.tensor(X), 10).k == 5


# ------------------------------------------------------------------------------------------------ moment metrics
def test_between_class_variance_ratio_and_centroid_distance_by_hand():
    # class 0 at 0 and 2 (mean 1), class 1 at 10 and 12 (mean 11): within = 1, between = ¼·10² = 25
    Z = torch.tensor([[0.0], [2.0], [10.0], [12.0]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    assert between_class_variance_ratio(Z, y) == pytest.approx(25 / 26)
    assert centroid_distance(Z, y) == pytest.approx(10.0)
    # unbalanced: class 0 = {0, 0, 0}, class 1 = {4}: p0 p1 = 3/16, between = 3, within = 0
    Z2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [4.0, 1.0]], dtype=F64)
    assert between_class_variance_ratio(Z2, torch.tensor([0, 0, 0, 1])) == pytest.approx(1.0)


def test_weighted_full_space_ratio_equals_ratio_on_resampled_data():
    X, y = _two_classes(50, 30, 12, 1.0)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    gen = torch.Generator().manual_seed(2)
    i0, i1 = stratified_bootstrap(50, 30, 3, gen)
    reps = weighted_between_ratio(Xt[yt == 0], Xt[yt == 1], index_counts(i0, 50), index_counts(i1, 30))
    for b in range(3):
        Xb = torch.cat([Xt[yt == 0][i0[b]], Xt[yt == 1][i1[b]]])
        yb = torch.tensor([0] * 50 + [1] * 30)
        assert float(reps[b]) == pytest.approx(between_class_variance_ratio(Xb, yb), rel=1e-9)


def test_weighted_moment_metrics_equal_calls_on_each_resampled_data_set():
    X, y = _two_classes(40, 35, 5, 1.0)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    gen = torch.Generator().manual_seed(3)
    i0, i1 = stratified_bootstrap(40, 35, 3, gen)
    Z0, Z1 = Xt[yt == 0], Xt[yt == 1]
    batch = moment_metrics(Z0, Z1, index_counts(i0, 40), index_counts(i1, 35))
    for b in range(3):
        Zb = torch.cat([Z0[i0[b]], Z1[i1[b]]])
        yb = torch.tensor([0] * 40 + [1] * 35)
        assert float(batch["bhattacharyya"][b]) == pytest.approx(bhattacharyya_distance(Zb, yb), rel=1e-9)
        assert float(batch["centroid_distance"][b]) == pytest.approx(centroid_distance(Zb, yb), rel=1e-9)


# -------------------------------------------------------------------------------------------------------- probe
@pytest.mark.parametrize("newton_max_dim", [256, 1])  # batched Newton, then L-BFGS
def test_probe_is_chance_on_shuffled_labels_and_perfect_on_separable_data(newton_max_dim):
    X, y = _two_classes(200, 200, 8, 12.0)
    sep = probe_cv_accuracy(torch.tensor(X), torch.tensor(y), newton_max_dim=newton_max_dim)
    assert sep.accuracy > 0.99
    shuffled = np.random.default_rng(0).permutation(y)
    chance = probe_cv_accuracy(torch.tensor(X), torch.tensor(shuffled), newton_max_dim=newton_max_dim)
    assert abs(chance.accuracy - 0.5) < 0.08
    assert chance.n == 400 and chance.folds == 5


@pytest.mark.parametrize("newton_max_dim", [256, 1])
def test_probe_agrees_with_sklearn_pipeline_on_the_same_folds(newton_max_dim):
    X, y = _two_classes(150, 150, 6, 1.0)
    fold = stratified_folds(torch.tensor(y), 5, torch.Generator().manual_seed(11)).numpy()
    ours = probe_cv_accuracy(torch.tensor(X), torch.tensor(y), seed=11, C=0.5, newton_max_dim=newton_max_dim)
    ref = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-8, max_iter=1000)),
        X,
        y,
        cv=PredefinedSplit(fold),
    )
    # same folds, same objective: predictions agree up to items sitting on the decision boundary
    assert ours.accuracy == pytest.approx(float(np.mean(ref)), abs=2 / 300)


def test_stratified_folds_balance_classes():
    y = torch.tensor([0] * 23 + [1] * 11)
    fold = stratified_folds(y, 5, torch.Generator().manual_seed(0))
    for f in range(5):
        assert int(((fold == f) & (y == 0)).sum()) in (4, 5)
        assert int(((fold == f) & (y == 1)).sum()) in (2, 3)


# --------------------------------------------------------------------------------------------------- intervals
def test_wilson_interval_known_value():
    lo, hi = wilson_interval(8, 10, 0.95)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_bootstrap_interval_methods_and_nan_replicates():
    reps = torch.tensor([float(i) for i in range(101)] + [float("nan")] * 3, dtype=F64)
    lo, hi, bad = bootstrap_interval(reps, 50.0, 0.9, "percentile")
    assert (lo, hi, bad) == (pytest.approx(5.0), pytest.approx(95.0), 3)
    lo_bc, hi_bc, _ = bootstrap_interval(reps, 50.0, 0.9, "bc")  # centred replicates: bc == percentile
    assert (lo_bc, hi_bc) == (pytest.approx(5.0, abs=0.6), pytest.approx(95.0, abs=0.6))
    lo_b, hi_b, _ = bootstrap_interval(reps, 30.0, 0.9, "bc")  # estimate below the replicates: shifted down
    assert lo_b < 5.0 and hi_b < 95.0


# ---------------------------------------------------------------------------------------------------- one cell
def test_cell_metrics_computes_every_metric_with_intervals():
    X, y = _two_classes(80, 60, 16, 6.0)
    Xt = torch.tensor(X, dtype=torch.float32)
    fit = fit_pca(Xt, 4)
    out = cell_metrics(fit.transform(Xt), torch.tensor(y), X=Xt, bootstrap=40, seed=1)
    assert list(out) == list(SEPARATION_METRICS)
    for name, mv in out.items():
        assert mv.status == "ok", (name, mv)
        assert math.isfinite(mv.value)
        if name != "pca_explained_variance":
            assert mv.ci_low <= mv.ci_high
    assert out["probe_accuracy"].value > 0.85
    assert 0 < out["pca_explained_variance"].value <= 1
    again = cell_metrics(fit.transform(Xt), torch.tensor(y), X=Xt, bootstrap=40, seed=1)
    assert again == out  # seeded


def test_cell_metrics_with_one_class_is_skipped():
    X, _ = _two_classes(30, 0, 4, 0.0)
    out = cell_metrics(torch.tensor(X), torch.zeros(30, dtype=torch.long), bootstrap=10)
    assert all(mv.status == "skipped" and mv.value is None for mv in out.values())
    assert "0 toxic and 30 benign" in out["bhattacharyya"].message


def test_cell_metrics_small_class_is_degraded_but_computed():
    X, y = _two_classes(3, 30, 6, 2.0)
    out = cell_metrics(torch.tensor(X), torch.tensor(y), X=torch.tensor(X), bootstrap=10, probe_folds=5)
    # the default closed form is undefined for a class of 3 items in 6 dimensions: marked, and the fix named
    assert out["bhattacharyya"].status == "degraded" and out["bhattacharyya"].value is None
    assert "rank-deficient" in out["bhattacharyya"].message and "ledoit_wolf" in out["bhattacharyya"].message
    lw = cell_metrics(torch.tensor(X), torch.tensor(y), bootstrap=10, shrinkage="ledoit_wolf")["bhattacharyya"]
    assert lw.status == "degraded" and math.isfinite(lw.value) and "held finite only by shrinkage" in lw.message
    assert out["probe_accuracy"].status == "degraded" and "3-fold" in out["probe_accuracy"].message
    assert out["silhouette_euclidean"].status == "ok"


def test_cell_metrics_on_identical_points_degrades_instead_of_failing():
    Z = torch.ones(20, 3, dtype=F64)
    y = torch.tensor([0] * 10 + [1] * 10)
    out = cell_metrics(Z, y, X=Z, bootstrap=5, shrinkage=0.0)
    assert out["bhattacharyya"].status == "degraded" and out["bhattacharyya"].value is None
    assert out["silhouette_euclidean"].value == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cell_metrics_on_cuda_match_cpu():
    X, y = _two_classes(100, 90, 12, 1.5)
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    Z = fit_pca(Xt, 5).transform(Xt)
    cpu = cell_metrics(Z, yt, X=Xt, bootstrap=20)
    gpu = cell_metrics(Z.cuda(), yt.cuda(), X=Xt.cuda(), bootstrap=20)
    for name in cpu:
        assert gpu[name].value == pytest.approx(cpu[name].value, rel=1e-5, abs=1e-7), name
        if cpu[name].ci_low is not None:
            assert gpu[name].ci_low == pytest.approx(cpu[name].ci_low, rel=1e-4, abs=1e-6), name
