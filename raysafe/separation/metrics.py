"""Separation metrics between two classes of hidden-state vectors: pure functions in torch.

Everything here takes tensors and returns tensors or plain numbers; nothing reads files or logs. The functions run
on whatever device their input tensors live on (CUDA when the activations are there, CPU otherwise) and compute in
float64 where precision matters (covariances, log-determinants, distances of the point estimates).

Labels are binary: ``y == 1`` is the toxic / harmful class, ``y == 0`` the benign one.

Metrics (docs/separation.md gives the formulas):

* :func:`fit_pca` — principal components (exact eigendecomposition of the covariance or Gram matrix, or a
  randomised range finder for very large ``n`` and ``d``);
* :func:`bhattacharyya_distance` — between Gaussian fits of the two classes: the plain closed form on the biased
  class covariances by default (as the paper), optionally shrunk towards a scaled identity (Ledoit-Wolf or a fixed
  ``alpha``);
* :func:`silhouette` — mean silhouette of the two classes (euclidean or cosine), exact, pairwise distances in
  row chunks; with bootstrap count weights it returns every resample's silhouette in one pass;
* :func:`centroid_distance` — distance of the class means in units of the pooled within-class spread;
* :func:`between_class_variance_ratio` — share of the total variance that lies between the two class means;
* :func:`probe_cv_accuracy` — stratified k-fold cross-validated accuracy of an L2 logistic regression (batched
  Newton for small dimensions, L-BFGS for large ones);
* :func:`cell_metrics` — all of the above for one (model, language, layer) cell with stratified bootstrap
  percentile intervals, computed for all resamples at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

F64 = torch.float64

Shrinkage = Literal["ledoit_wolf"] | float
PCASolver = Literal["auto", "covariance", "gram", "randomized"]

#: Every separation metric :func:`cell_metrics` can compute. Larger is "more separated" for all of them except
#: ``pca_explained_variance``, which describes the projection, not the classes.
SEPARATION_METRICS: tuple[str, ...] = (
    "bhattacharyya",
    "silhouette_euclidean",
    "silhouette_cosine",
    "centroid_distance",
    "between_var_ratio",
    "between_var_ratio_full",
    "probe_accuracy",
    "pca_explained_variance",
)
#: Metrics that need the full-dimensional vectors, not only the PCA projection.
FULL_SPACE_METRICS: frozenset[str] = frozenset({"between_var_ratio_full", "pca_explained_variance"})
#: Metrics whose interval comes from the stratified bootstrap (the probe gets a Wilson interval instead).
BOOTSTRAP_METRICS: frozenset[str] = frozenset(
    {
        "bhattacharyya",
        "silhouette_euclidean",
        "silhouette_cosine",
        "centroid_distance",
        "between_var_ratio",
        "between_var_ratio_full",
    }
)


# ================================================================================================== PCA
@dataclass(frozen=True)
class PCAFit:
    """A fitted principal-component projection.

    ``components`` [k, d] has orthonormal rows (sign fixed so that each row's largest-magnitude loading is
    positive); ``explained_variance`` [k] are the variances along them (unbiased, divisor n - 1, as scikit-learn);
    ``total_variance`` is the trace of the unbiased covariance of the data the fit saw.
    """

    mean: Tensor
    components: Tensor
    explained_variance: Tensor
    total_variance: float
    n_samples: int

    @property
    def k(self) -> int:
        """Number of components kept."""
        return int(self.components.shape[0])

    @property
    def explained_variance_ratio(self) -> Tensor:
        """Share of the total variance along each component."""
        if self.total_variance <= 0:
            return torch.zeros_like(self.explained_variance)
        return self.explained_variance / self.total_variance

    def transform(self, X: Tensor, chunk_rows: int = 8192) -> Tensor:
        """Project ``X`` [n, d] onto the components: ``(X - mean) @ components.T`` in float64, row chunk by chunk
        so that no float64 copy of ``X`` is made."""
        out = torch.empty((X.shape[0], self.k), dtype=F64, device=X.device)
        mean = self.mean.to(X.device)
        comps_t = self.components.to(X.device).T
        for s in range(0, X.shape[0], chunk_rows):
            out[s : s + chunk_rows] = (X[s : s + chunk_rows].to(F64) - mean) @ comps_t
        return out


def _column_mean(X: Tensor, chunk_rows: int) -> Tensor:
    """Column means of ``X`` in float64, accumulated over row chunks."""
    total = torch.zeros(X.shape[1], dtype=F64, device=X.device)
    for s in range(0, X.shape[0], chunk_rows):
        total += X[s : s + chunk_rows].to(F64).sum(0)
    return total / X.shape[0]


def _fix_signs(components: Tensor) -> Tensor:
    """Flip each row so its largest-magnitude entry is positive (a deterministic sign convention)."""
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return components * signs


def _randomized_top(X: Tensor, mean: Tensor, k: int, oversample: int, niter: int, seed: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` right singular vectors and singular values of the centred ``X`` by a randomised range finder
    (Halko et al. 2011) with ``niter`` power iterations; centring is applied implicitly, matmuls in ``X``'s dtype
    (at least float32)."""
    dt = X.dtype if X.dtype in (torch.float32, F64) else torch.float32
    Xd = X.to(dt)
    mu = mean.to(dt)
    q = min(k + oversample, min(X.shape))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(X.shape[1], q, generator=gen, dtype=dt).to(X.device)

    def a_mul(m: Tensor) -> Tensor:  # (X - 1 mu^T) @ m
        return Xd @ m - mu[None, :] @ m

    def at_mul(m: Tensor) -> Tensor:  # (X - 1 mu^T)^T @ m
        return Xd.T @ m - mu[:, None] * m.sum(0, keepdim=True)

    Y, _ = torch.linalg.qr(a_mul(omega))
    for _ in range(niter):
        Wt, _ = torch.linalg.qr(at_mul(Y))
        Y, _ = torch.linalg.qr(a_mul(Wt))
    Bt = at_mul(Y).to(F64)  # [d, q] = (Y^T A)^T
    _, s, vh = torch.linalg.svd(Bt.T, full_matrices=False)
    return vh[:k], s[:k]


def fit_pca(
    X: Tensor, k: int, *, solver: PCASolver = "auto", chunk_rows: int = 8192, exact_max_dim: int = 2048, seed: int = 0
) -> PCAFit:
    """Fit a k-component PCA on ``X`` [n, d] (rows = items).

    Keeps ``min(k, d, n - 1)`` components (check ``fit.k``). Solvers: ``covariance`` — eigh of the d×d scatter
    matrix accumulated in float64 over row chunks (cost n·d² + d³); ``gram`` — eigh of the n×n Gram matrix of the
    centred rows (cost n²·d + n³, for n < d); ``randomized`` — randomised range finder with 7 power iterations
    (cost ≈ 16·n·d·(k + 10)); ``auto`` — the exact solver of the smaller side when min(n, d) <= ``exact_max_dim``,
    randomised otherwise. The total variance is always exact.
    """
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n, d], got shape {tuple(X.shape)}")
    n, d = X.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {n}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_eff = min(k, d, n - 1)
    mean = _column_mean(X, chunk_rows)
    if solver == "auto":
        if min(n, d) > exact_max_dim:
            solver = "randomized"
        else:
            solver = "covariance" if d <= n else "gram"
    if solver == "covariance":
        scatter = torch.zeros(d, d, dtype=F64, device=X.device)
        for s in range(0, n, chunk_rows):
            xc = X[s : s + chunk_rows].to(F64) - mean
            scatter += xc.T @ xc
        total = float(torch.diagonal(scatter).sum()) / (n - 1)
        evals, evecs = torch.linalg.eigh(scatter)
        order = torch.argsort(evals, descending=True)[:k_eff]
        ev = evals[order].clamp_min(0) / (n - 1)
        comps = evecs[:, order].T
    elif solver == "gram":
        xc = X.to(F64) - mean
        gram = xc @ xc.T
        total = float(torch.diagonal(gram).sum()) / (n - 1)
        evals, evecs = torch.linalg.eigh(gram)
        order = torch.argsort(evals, descending=True)[:k_eff]
        lam = evals[order].clamp_min(0)
        comps = (evecs[:, order].T @ xc) / lam.sqrt().clamp_min(1e-300)[:, None]
        comps = comps / torch.linalg.vector_norm(comps, dim=1, keepdim=True).clamp_min(1e-300)
        ev = lam / (n - 1)
    elif solver == "randomized":
        total = 0.0
        for s in range(0, n, chunk_rows):
            total += float(((X[s : s + chunk_rows].to(F64) - mean) ** 2).sum())
        total /= n - 1
        comps, sv = _randomized_top(X, mean, k_eff, oversample=10, niter=7, seed=seed)
        ev = sv**2 / (n - 1)
    else:
        raise ValueError(f"unknown PCA solver {solver!r}; use auto, covariance, gram or randomized")
    return PCAFit(
        mean=mean,
        components=_fix_signs(comps.to(F64)),
        explained_variance=ev.to(F64),
        total_variance=total,
        n_samples=n,
    )


# ================================================================================== Gaussian / moment metrics
def weighted_class_moments(Z: Tensor, W: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean [B, k], biased covariance [B, k, k] (divisor n) and Ledoit-Wolf shrinkage intensity [B] of the rows of
    ``Z`` [n, k] under count weights ``W`` [B, n] (row b = how often each row appears in resample b, row sums n;
    None = the data itself, B = 1), without materialising the resamples.

    The intensity is that of ``sklearn.covariance.ledoit_wolf_shrinkage``: with centred rows xᵢ and S the biased
    covariance, β = (Σᵢ‖xᵢ‖⁴/n − ‖S‖²_F) / (k·n), δ = ‖S − (tr S / k)·I‖²_F / k, α = min(β, δ) / δ. Every term is
    a weighted sum of per-row features (x, x⊗x, ‖x‖²·x, ‖x‖², ‖x‖⁴) — one matrix product — expanded around the
    resample mean; rows are first centred at the data mean, which none of the results depends on.
    """
    n, k = Z.shape
    Z = Z.to(F64)
    center = Z.mean(0)
    x = Z - center
    if W is None:
        W = torch.ones(1, n, dtype=F64, device=Z.device)
    W = W.to(device=Z.device, dtype=F64)
    sq = (x * x).sum(1)
    feats = torch.cat(
        [x, (x[:, :, None] * x[:, None, :]).reshape(n, k * k), sq[:, None] * x, sq[:, None], (sq * sq)[:, None]], dim=1
    )
    S = W @ feats / n  # weighted means of the features [B, 2k + k² + 2]
    m = S[:, :k]
    M2 = S[:, k : k + k * k].reshape(-1, k, k)
    sq_x = S[:, k + k * k : 2 * k + k * k]  # E[‖x‖² x]
    e_sq = S[:, -2]  # E[‖x‖²]
    e_sq2 = S[:, -1]  # E[‖x‖⁴]
    cov = M2 - m[:, :, None] * m[:, None, :]
    # E‖x − m‖⁴ = E‖x‖⁴ − 4 E[‖x‖² x]·m + 4 mᵀ E[xxᵀ] m + 2 E‖x‖² ‖m‖² − 4 E[x]·m ‖m‖² + ‖m‖⁴  (E[x] = m)
    mm = (m * m).sum(1)
    e4 = (
        e_sq2
        - 4 * (sq_x * m).sum(1)
        + 4 * torch.einsum("bi,bij,bj->b", m, M2, m)
        + 2 * e_sq * mm
        - 4 * mm * mm
        + mm * mm
    )
    tr = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    mu = tr / k
    delta_ = (cov * cov).sum(dim=(1, 2))
    beta = (e4 - delta_) / (k * n)
    delta = (delta_ - 2.0 * mu * tr + k * mu * mu) / k
    beta = torch.minimum(beta, delta)
    alpha = torch.where(beta <= 0, torch.zeros_like(beta), beta / delta.clamp_min(1e-300))
    return m + center, cov, alpha


def shrink_covariance(cov: Tensor, alpha: Tensor | float) -> Tensor:
    """``(1 - α)·cov + α·(tr cov / k)·I`` for a batch of covariances [B, k, k] (α scalar or [B])."""
    k = cov.shape[-1]
    a = torch.as_tensor(alpha, dtype=cov.dtype, device=cov.device)
    if a.ndim == 0:
        a = a.expand(cov.shape[0])
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / k
    eye = torch.eye(k, dtype=cov.dtype, device=cov.device)
    return (1 - a)[:, None, None] * cov + (a * scale)[:, None, None] * eye


def bhattacharyya_gaussian(mu0: Tensor, cov0: Tensor, mu1: Tensor, cov1: Tensor) -> Tensor:
    """Bhattacharyya distance [B] between N(mu0, cov0) and N(mu1, cov1), batched:
    ``D = ⅛ Δᵀ Σ⁻¹ Δ + ½ ln( det Σ / √(det Σ0 · det Σ1) )`` with ``Σ = (Σ0 + Σ1) / 2`` and ``Δ = mu1 - mu0``.
    Entries whose covariances are not positive definite are NaN."""
    cov = 0.5 * (cov0 + cov1)
    L, info = torch.linalg.cholesky_ex(cov)
    L0, info0 = torch.linalg.cholesky_ex(cov0)
    L1, info1 = torch.linalg.cholesky_ex(cov1)
    ok = (info == 0) & (info0 == 0) & (info1 == 0)

    def logdet(chol: Tensor) -> Tensor:
        return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    delta = (mu1 - mu0)[..., None]
    sol = torch.cholesky_solve(delta, L)
    maha = (delta * sol).sum(dim=(-2, -1))
    d = maha / 8.0 + 0.5 * (logdet(L) - 0.5 * (logdet(L0) + logdet(L1)))
    return torch.where(ok & torch.isfinite(d), d, torch.full_like(d, float("nan")))


def moment_metrics(
    Z0: Tensor, Z1: Tensor, W0: Tensor | None = None, W1: Tensor | None = None, shrinkage: Shrinkage = 0.0
) -> dict[str, Tensor]:
    """Bhattacharyya distance, normalised centroid distance and between-class variance ratio [B] of the benign rows
    ``Z0`` [n0, k] and toxic rows ``Z1`` [n1, k] under count weights ``W0`` [B, n0], ``W1`` [B, n1] (None: the
    data itself, B = 1), all from the same class moments (:func:`weighted_class_moments`).

    With ``p_c = n_c / n``, class means ``m_c`` and biased covariances ``S_c``: within = p0·tr S0 + p1·tr S1,
    between = p0·p1·‖m1 − m0‖², ratio = between / (within + between), centroid = ‖m1 − m0‖ / √within; the
    Bhattacharyya distance uses each S_c as it is (``shrinkage=0``, the default), shrunk by its Ledoit-Wolf intensity
    (``"ledoit_wolf"``) or by the fixed α ``shrinkage``.
    """
    n0, n1 = Z0.shape[0], Z1.shape[0]
    mu0, cov0, a0 = weighted_class_moments(Z0, W0)
    mu1, cov1, a1 = weighted_class_moments(Z1, W1)
    if shrinkage != "ledoit_wolf":
        a0 = a1 = float(shrinkage)
    p0, p1 = n0 / (n0 + n1), n1 / (n0 + n1)
    gap2 = ((mu1 - mu0) ** 2).sum(-1)
    within = p0 * torch.diagonal(cov0, dim1=-2, dim2=-1).sum(-1) + p1 * torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1)
    between = p0 * p1 * gap2
    total = within + between
    nan = torch.full_like(total, float("nan"))
    ratio = torch.where(total > 0, between / total.clamp_min(1e-300), nan)
    centroid = torch.where(within > 0, gap2.sqrt() / within.clamp_min(1e-300).sqrt(), nan)
    bd = bhattacharyya_gaussian(mu0, shrink_covariance(cov0, a0), mu1, shrink_covariance(cov1, a1))
    return {"bhattacharyya": bd, "centroid_distance": centroid, "between_var_ratio": ratio}


def shrinkage_label(shrinkage: Shrinkage) -> str:
    """How the Bhattacharyya covariances were estimated, as the tables name it: ``none`` (the plain closed form on
    the biased class covariances, as the paper), ``ledoit_wolf`` or ``fixed α=<α>``."""
    if shrinkage == "ledoit_wolf":
        return "ledoit_wolf"
    return "none" if float(shrinkage) == 0.0 else f"fixed α={float(shrinkage):g}"


#: The unit of each metric's value, written beside it in every table and figure.
METRIC_UNITS: dict[str, str] = {
    "bhattacharyya": "nats",
    "silhouette_euclidean": "score in [-1, 1]",
    "silhouette_cosine": "score in [-1, 1]",
    "centroid_distance": "within-class s.d.",
    "between_var_ratio": "fraction (×100 = % of the paper)",
    "between_var_ratio_full": "fraction (×100 = % of the paper)",
    "probe_accuracy": "fraction",
    "pca_explained_variance": "fraction",
    "detox_mean_norm": "hidden-state norm",
    "detox_pair_norm": "hidden-state norm",
    "detox_consistency": "ratio in [0, 1]",
    "detox_cos_en": "cosine",
    "detox_proj_en": "hidden-state norm",
    "detox_cos_own": "cosine",
}


def metric_unit(metric: str) -> str | None:
    """The unit of ``metric`` (None for a metric without one listed)."""
    return METRIC_UNITS.get(metric)


def _split(Z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(benign rows, toxic rows) of ``Z`` as float64."""
    y = y.to(Z.device)
    return Z[y == 0].to(F64), Z[y == 1].to(F64)


def bhattacharyya_distance(Z: Tensor, y: Tensor, shrinkage: Shrinkage = 0.0) -> float:
    """Bhattacharyya distance between Gaussian fits of the two classes of ``Z`` [n, k] (labels ``y``): the plain
    closed form by default; with ``shrinkage`` each class covariance is shrunk towards its scaled identity
    (Ledoit-Wolf intensity, or the fixed α given). NaN when a
    covariance is singular (possible only with α = 0)."""
    Z0, Z1 = _split(Z, y)
    return float(moment_metrics(Z0, Z1, shrinkage=shrinkage)["bhattacharyya"][0])


def between_class_variance_ratio(Z: Tensor, y: Tensor) -> float:
    """Share of the total variance of ``Z`` that lies between the two class means:
    ``p0·p1·‖m1 − m0‖² / tr Cov(Z)`` (biased covariance, so total = within + between exactly)."""
    Z0, Z1 = _split(Z, y)
    return float(moment_metrics(Z0, Z1, shrinkage=0.0)["between_var_ratio"][0])


def centroid_distance(Z: Tensor, y: Tensor) -> float:
    """Distance between the class means in units of the pooled within-class spread:
    ``‖m1 − m0‖ / √(p0·tr S0 + p1·tr S1)``."""
    Z0, Z1 = _split(Z, y)
    return float(moment_metrics(Z0, Z1, shrinkage=0.0)["centroid_distance"][0])


def weighted_between_parts(X0: Tensor, X1: Tensor, W0: Tensor, W1: Tensor) -> tuple[Tensor, Tensor]:
    """Between-class variance p0·p1·‖m1 − m0‖² and total variance (biased trace) [B] of ``X0`` [n0, d] and
    ``X1`` [n1, d] under count weights ``W0`` [B, n0], ``W1`` [B, n1] (row b = how often each item appears in
    resample b; all ones = the data itself). Works in the full dimension without materialising the resamples:
    means are ``W @ X / n_c``, traces ``W @ ‖x‖² / n_c − ‖mean‖²``, on rows centred at the overall mean (float64)."""
    n0, n1 = X0.shape[0], X1.shape[0]
    center = (X0.to(F64).sum(0) + X1.to(F64).sum(0)) / (n0 + n1)
    X0c, X1c = X0.to(F64).sub_(center), X1.to(F64).sub_(center)
    W0, W1 = W0.to(device=X0c.device, dtype=F64), W1.to(device=X0c.device, dtype=F64)
    mu0, mu1 = W0 @ X0c / n0, W1 @ X1c / n1
    tr0 = W0 @ (X0c * X0c).sum(1) / n0 - (mu0 * mu0).sum(1)
    tr1 = W1 @ (X1c * X1c).sum(1) / n1 - (mu1 * mu1).sum(1)
    p0, p1 = n0 / (n0 + n1), n1 / (n0 + n1)
    between = p0 * p1 * ((mu1 - mu0) ** 2).sum(1)
    return between, p0 * tr0.clamp_min(0) + p1 * tr1.clamp_min(0) + between


def weighted_between_ratio(X0: Tensor, X1: Tensor, W0: Tensor, W1: Tensor) -> Tensor:
    """Between-class variance ratio [B] of ``X0``, ``X1`` under count weights ``W0``, ``W1``
    (:func:`weighted_between_parts`); NaN where the total variance is 0."""
    between, total = weighted_between_parts(X0, X1, W0, W1)
    return torch.where(total > 0, between / total.clamp_min(1e-300), torch.full_like(total, float("nan")))


# ============================================================================================== silhouette
def _normalise_rows(A: Tensor) -> Tensor:
    """Rows scaled to unit length (zero rows stay zero)."""
    return A / torch.linalg.vector_norm(A, dim=1, keepdim=True).clamp_min(1e-300)


def _pairwise(A: Tensor, B: Tensor, metric: str) -> Tensor:
    """Euclidean distances, or cosine distances of rows that are already unit length (``_normalise_rows``)."""
    if metric == "euclidean":
        return torch.cdist(A, B)
    return (1.0 - A @ B.T).clamp_(0.0, 2.0)


def silhouette_pass(
    Z0: Tensor,
    Z1: Tensor,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    W0: Tensor | None = None,
    W1: Tensor | None = None,
    chunk_rows: int = 2048,
) -> tuple[Tensor, Tensor | None]:
    """One pass over the pairwise distances of the classes ``Z0`` [n0, k] and ``Z1`` [n1, k], in row blocks of
    ``chunk_rows``: returns the exact silhouette of the data (0-d, float64) and, given count weights ``W0``
    [B, n0] and ``W1`` [B, n1] (stratified bootstrap, row sums n0 and n1), the silhouette of each resampled data
    set [B] (weighted sums in float32 matrix products), else None. Memory: chunk_rows·n + n·B numbers."""
    Z0, Z1 = Z0.to(F64), Z1.to(F64)
    if metric == "cosine":
        Z0, Z1 = _normalise_rows(Z0), _normalise_rows(Z1)
    elif metric != "euclidean":
        raise ValueError(f"unknown distance {metric!r}; use euclidean or cosine")
    n0, n1 = Z0.shape[0], Z1.shape[0]
    dev = Z0.device
    boot = W0 is not None and W1 is not None
    Wt = {0: W0.to(device=dev, dtype=torch.float32).T, 1: W1.to(device=dev, dtype=torch.float32).T} if boot else {}
    point = torch.zeros((), dtype=F64, device=dev)
    reps = torch.zeros(W0.shape[0], dtype=F64, device=dev) if boot else None
    Zs, ns = {0: Z0, 1: Z1}, {0: n0, 1: n1}
    for own, oth in ((0, 1), (1, 0)):
        n_own, n_oth = ns[own], ns[oth]
        if n_own < 2:  # s(i) = 0 for a class of one
            continue
        for s in range(0, n_own, chunk_rows):
            rows = Zs[own][s : s + chunk_rows]
            d_own = _pairwise(rows, Zs[own], metric)
            d_oth = _pairwise(rows, Zs[oth], metric)
            point += _silhouette_sum(d_own.sum(1, keepdim=True), d_oth.sum(1, keepdim=True), n_own, n_oth, None)[0]
            if boot:
                a = d_own.to(torch.float32) @ Wt[own]  # [r, B] weighted sums of own-class distances
                b = d_oth.to(torch.float32) @ Wt[oth]
                reps += _silhouette_sum(a, b, n_own, n_oth, Wt[own][s : s + chunk_rows])
    total = n0 + n1
    return point / total, (reps / total if boot else None)


def _silhouette_sum(sum_own: Tensor, sum_oth: Tensor, n_own: int, n_oth: int, w: Tensor | None) -> Tensor:
    """Σ_i w_i·s(i) per column from the (weighted) distance sums of each row to its own and the other class."""
    a = sum_own.to(F64) / (n_own - 1)
    b = sum_oth.to(F64) / n_oth
    m = torch.maximum(a, b)
    s_i = torch.where(m > 0, (b - a) / m.clamp_min(1e-300), torch.zeros_like(m))
    if w is None:
        return s_i.sum(0)
    return (w.to(F64) * s_i).sum(0)


def silhouette(
    Z: Tensor,
    y: Tensor,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    *,
    W0: Tensor | None = None,
    W1: Tensor | None = None,
    chunk_rows: int = 2048,
) -> Tensor:
    """Mean silhouette coefficient of the two classes of ``Z`` [n, k], exact (same definition as
    ``sklearn.metrics.silhouette_score``): for item i, a(i) = mean distance to the other items of its class,
    b(i) = mean distance to the items of the other class, s(i) = (b − a) / max(a, b) (0 for a class of one).

    Without weights returns a 0-d tensor. With count weights ``W0`` [B, n0] and ``W1`` [B, n1] (stratified
    bootstrap) returns [B]: the silhouette of each resampled data set, duplicates included (see
    :func:`silhouette_pass`, which gives both at once).
    """
    Z0, Z1 = _split(Z, y)
    point, reps = silhouette_pass(Z0, Z1, metric, W0, W1, chunk_rows)
    return point if reps is None else reps


# ===================================================================================================== probe
@dataclass(frozen=True)
class ProbeResult:
    """Out-of-fold result of a cross-validated linear probe: ``n_correct`` of ``n`` items, ``folds`` used."""

    accuracy: float
    n_correct: int
    n: int
    folds: int


def stratified_folds(y: Tensor, folds: int, generator: torch.Generator) -> Tensor:
    """Fold id [n] of each item: within each class a random permutation (``generator``, CPU) dealt round-robin,
    so every fold holds ⌊n_c / folds⌋ or ⌈n_c / folds⌉ items of class c."""
    y_cpu = y.detach().cpu()
    out = torch.empty(y_cpu.shape[0], dtype=torch.long)
    for c in (0, 1):
        idx = torch.nonzero(y_cpu == c).flatten()
        perm = idx[torch.randperm(idx.numel(), generator=generator)]
        out[perm] = torch.arange(idx.numel()) % folds
    return out.to(y.device)


def _logistic_loss(z: Tensor, y: Tensor) -> Tensor:
    """Per-item logistic loss softplus(z) − y·z, stable for large |z|."""
    return torch.nn.functional.softplus(z) - y * z


def _fit_newton(Xs: Tensor, y: Tensor, M: Tensor, C: float, max_iter: int, tol: float) -> Tensor:
    """Fit F independent L2 logistic regressions at once by damped Newton.

    ``Xs`` [F, n, p] holds each fold's standardised features with a final column of ones (the unpenalised
    intercept), ``M`` [F, n] the training masks. Objective per fold: ½‖w‖² + C·Σ_train loss. Returns [F, p]."""
    F_, n, p = Xs.shape
    w = torch.zeros(F_, p, dtype=F64, device=Xs.device)
    reg = torch.ones(p, dtype=F64, device=Xs.device)
    reg[-1] = 0.0
    ridge = torch.diag(reg + 1e-10)

    def objective(wv: Tensor) -> Tensor:
        z = torch.einsum("fnp,fp->fn", Xs, wv)
        return 0.5 * (reg * wv * wv).sum(1) + C * (M * _logistic_loss(z, y)).sum(1)

    loss = objective(w)
    for _ in range(max_iter):
        z = torch.einsum("fnp,fp->fn", Xs, w)
        pr = torch.sigmoid(z)
        grad = C * torch.einsum("fnp,fn->fp", Xs, M * (pr - y)) + reg * w
        s = M * pr * (1 - pr)
        H = C * torch.einsum("fnp,fn,fnq->fpq", Xs, s, Xs) + ridge
        step = torch.linalg.solve(H, grad[..., None])[..., 0]
        decrement = (grad * step).sum(1)
        if float(decrement.max()) < tol:
            break
        t = torch.ones(F_, dtype=F64, device=Xs.device)
        accepted = torch.zeros(F_, dtype=torch.bool, device=Xs.device)
        new_w, new_loss = w.clone(), loss.clone()
        for _ in range(40):
            cand = w - t[:, None] * step
            cl = objective(cand)
            ok = (~accepted) & (cl <= loss - 1e-4 * t * decrement)
            new_w[ok], new_loss[ok] = cand[ok], cl[ok]
            accepted |= ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, t * 0.5)
        w, loss = new_w, new_loss
        if not bool(accepted.any()):
            break
    return w


def _fit_lbfgs(
    Xd: Tensor, y: Tensor, M: Tensor, mean: Tensor, std: Tensor, C: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """Fit F independent L2 logistic regressions on standardised features by one L-BFGS run (strong Wolfe line
    search) over all folds, without materialising the standardised copies: with u = w / std the logits are
    ``X @ u + (b − mean·u)``, one shared matrix product for all folds. Objective per fold
    (½‖w‖² + C·Σ_train loss) / n_train. Returns ``u`` [F, d] and the offsets ``c`` [F] of ``z = X @ u + c``."""
    F_, d = mean.shape
    ntr = M.sum(1)
    w = torch.zeros(F_, d, dtype=F64, device=Xd.device, requires_grad=True)
    b = torch.zeros(F_, dtype=F64, device=Xd.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def logits() -> Tensor:
        u = w / std
        return (Xd @ u.T).T + (b - (mean * u).sum(1))[:, None]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = ((0.5 * (w * w).sum(1) + C * (M * _logistic_loss(logits(), y)).sum(1)) / ntr).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    u = (w / std).detach()
    return u, (b - (mean * w / std).sum(1)).detach()


def probe_cv_accuracy(
    X: Tensor,
    y: Tensor,
    *,
    folds: int = 5,
    C: float = 1.0,
    seed: int = 0,
    newton_max_dim: int = 256,
    max_iter: int = 100,
) -> ProbeResult:
    """Stratified ``folds``-fold cross-validated accuracy of an L2-regularised logistic regression on ``X`` [n, d].

    Each fold standardises the features with its training rows' mean and standard deviation, then minimises
    ½‖w‖² + C·Σ_train logistic loss (intercept unpenalised) — the objective of scikit-learn's
    ``make_pipeline(StandardScaler(), LogisticRegression(C=C))``. All folds are solved together: by damped Newton
    when d + 1 <= ``newton_max_dim``, by one L-BFGS run over a shared matrix product otherwise. Returns the
    pooled out-of-fold accuracy.
    Needs at least ``folds`` items per class (``ValueError`` otherwise).
    """
    y = y.to(X.device)
    n = X.shape[0]
    counts = [int((y == c).sum()) for c in (0, 1)]
    if min(counts) < folds or folds < 2:
        raise ValueError(f"{folds}-fold probe needs >= {folds} items per class and folds >= 2, have {counts}")
    fold = stratified_folds(y, folds, torch.Generator(device="cpu").manual_seed(seed))
    yf = y.to(F64)
    Xd = X.to(F64)
    p = Xd.shape[1] + 1
    train = torch.stack([fold != f for f in range(folds)])  # [F, n]
    Mf = train.to(F64)
    ntr = Mf.sum(1, keepdim=True)
    mean = Mf @ Xd / ntr  # [F, d]
    var = (Mf @ (Xd * Xd)) / ntr - mean**2
    std = var.clamp_min(0).sqrt()
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    if p <= newton_max_dim:
        Xs = (Xd[None] - mean[:, None, :]) / std[:, None, :]
        Xs = torch.cat([Xs, torch.ones(folds, n, 1, dtype=F64, device=X.device)], dim=2)
        W = _fit_newton(Xs, yf, Mf, C, max_iter=max_iter, tol=1e-10)
        z = torch.einsum("fnp,fp->fn", Xs, W)
    else:
        u, c = _fit_lbfgs(Xd, yf, Mf, mean, std, C, max_iter=max(max_iter, 1000), tol=1e-6)
        z = (Xd @ u.T).T + c[:, None]
    hits = ((z > 0).to(F64) == yf[None, :]) & ~train
    correct = int(hits.sum())
    return ProbeResult(accuracy=correct / n, n_correct=correct, n=n, folds=folds)


# ============================================================================================ intervals
def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` at confidence ``level``."""
    if n <= 0:
        return float("nan"), float("nan")
    z = _normal_quantile(0.5 + level / 2)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(p: float) -> float:
    """Standard normal quantile."""
    return float(torch.special.ndtri(torch.tensor(p, dtype=F64)))


def bootstrap_interval(
    replicates: Tensor, point: float, level: float = 0.95, method: Literal["percentile", "bc"] = "percentile"
) -> tuple[float, float, int]:
    """Bootstrap interval at ``level`` from ``replicates`` [B] of a statistic whose estimate is ``point``,
    ignoring NaN replicates; also returns how many replicates were NaN ((NaN, NaN, B) when none is finite).

    ``percentile``: the (1 ∓ level)/2 quantiles of the replicates. Distances near 0 are biased upwards, more so in
    resamples (duplicated items), so for weakly separated classes this interval can lie above the estimate.
    ``bc`` (bias-corrected percentile, Efron 1981): with z0 = Φ⁻¹(share of replicates below ``point``), the
    quantiles Φ(2·z0 ∓ z) — equal to ``percentile`` when the replicates are centred on the estimate, shifted
    towards it otherwise (when nearly all replicates lie on one side it shrinks to their extreme)."""
    r = replicates.detach().to(F64).cpu()
    finite = r[torch.isfinite(r)]
    n_bad = int(r.numel() - finite.numel())
    if finite.numel() == 0:
        return float("nan"), float("nan"), n_bad
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    if method == "bc":
        m = finite.numel()
        share = (float((finite < point).sum()) + 0.5 * float((finite == point).sum())) / m
        share = min(max(share, 0.5 / m), 1 - 0.5 / m)
        z0 = _normal_quantile(share)
        z = _normal_quantile(hi_q)
        lo_q, hi_q = _normal_cdf(2 * z0 - z), _normal_cdf(2 * z0 + z)
    elif method != "percentile":
        raise ValueError(f"unknown interval method {method!r}; use percentile or bc")
    q = torch.quantile(finite, torch.tensor([lo_q, hi_q], dtype=F64))
    return float(q[0]), float(q[1]), n_bad


def _normal_cdf(x: float) -> float:
    """Standard normal distribution function."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def stratified_bootstrap(n0: int, n1: int, resamples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Index matrices [B, n0] and [B, n1] (CPU, int64) of a stratified bootstrap: each resample draws n_c items
    with replacement within class c (so class sizes stay fixed). Drawn on the CPU so that results do not depend
    on the device."""
    i0 = torch.randint(0, n0, (resamples, n0), generator=generator)
    i1 = torch.randint(0, n1, (resamples, n1), generator=generator)
    return i0, i1


def index_counts(idx: Tensor, n: int) -> Tensor:
    """Count matrix [B, n] (float64): how many times each item appears in each resample of ``idx`` [B, m]."""
    out = torch.zeros(idx.shape[0], n, dtype=F64, device=idx.device)
    out.scatter_add_(1, idx, torch.ones_like(idx, dtype=F64))
    return out


# ============================================================================================ one cell
@dataclass(frozen=True)
class MetricValue:
    """One metric of one cell: point estimate, interval (None when not computed), status ``ok`` | ``degraded`` |
    ``skipped`` and a message saying why when not ok."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    status: str = "ok"
    message: str = ""


def _finite_or_none(x: float) -> float | None:
    """``x`` if finite else None."""
    return x if math.isfinite(x) else None


def cell_metrics(
    Z: Tensor,
    y: Tensor,
    *,
    X: Tensor | None = None,
    metrics: Sequence[str] = SEPARATION_METRICS,
    shrinkage: Shrinkage = 0.0,
    bootstrap: int = 200,
    ci_level: float = 0.95,
    ci_method: Literal["percentile", "bc"] = "percentile",
    seed: int = 0,
    probe_folds: int = 5,
    probe_C: float = 1.0,
    probe_on: Literal["pca", "full"] = "pca",
    chunk_rows: int = 2048,
) -> dict[str, MetricValue]:
    """All requested separation metrics of one (model, language, layer) cell.

    ``Z`` [n, k] is the PCA projection, ``y`` [n] the 0/1 labels, ``X`` [n, d] the full vectors (needed for
    ``between_var_ratio_full``, ``pca_explained_variance`` and ``probe_on="full"``). Bootstrap intervals
    (:func:`bootstrap_interval`, ``ci_method``) come from ``bootstrap`` stratified resamples drawn from ``seed``
    (on the CPU, so the same on every device), all evaluated at once through count weights [B, n] — the resampled
    data sets are never materialised. The probe's interval is the Wilson interval of its pooled out-of-fold
    accuracy.
    ``pca_explained_variance`` is tr Cov(Z) / tr Cov(X): the share of this language's variance inside the
    projection. Never raises on degenerate data: such metrics come back ``skipped`` or ``degraded``.
    """
    y = y.to(Z.device)
    Z0, Z1 = _split(Z, y)
    n0, n1 = Z0.shape[0], Z1.shape[0]
    out: dict[str, MetricValue] = {}
    unknown = [m for m in metrics if m not in SEPARATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(SEPARATION_METRICS)}")
    if min(n0, n1) < 2:
        msg = f"needs >= 2 items per class, have {n1} toxic and {n0} benign"
        return {m: MetricValue(None, None, None, "skipped", msg) for m in metrics}
    B = int(bootstrap)
    W0, W1 = _bootstrap_weights(n0, n1, B, seed, Z.device)
    want = set(metrics)

    def put(name: str, point: float, reps: Tensor | None, note: str = "") -> None:
        out[name] = _metric_value(point, reps, ci_level, ci_method, note)

    _put_moment_metrics(put, want, Z0, Z1, W0, W1, shrinkage, B)
    # ---- silhouettes (exact point estimate in float64 and all resamples in one pass over the distances)
    for dist in ("euclidean", "cosine"):
        name = f"silhouette_{dist}"
        if name in want:
            pt, reps_s = silhouette_pass(Z0, Z1, dist, W0[1:] if B > 0 else None, W1[1:] if B > 0 else None, chunk_rows)
            put(name, float(pt), reps_s)
    if FULL_SPACE_METRICS & want:
        _put_full_space_metrics(put, out, want, X, y, Z0, Z1, W0, W1, B)
    if "probe_accuracy" in want:
        feats = Z if probe_on == "pca" else X
        out["probe_accuracy"] = _probe_metric(feats, y, n0, n1, probe_folds, probe_C, seed, ci_level)
    return {m: out[m] for m in metrics}


def _bootstrap_weights(n0: int, n1: int, B: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Count weights [1 + B, n0] and [1 + B, n1]: row 0 the data itself, rows 1..B the stratified resamples
    drawn on the CPU from ``seed``."""
    W0 = torch.ones(1, n0, dtype=F64, device=device)
    W1 = torch.ones(1, n1, dtype=F64, device=device)
    if B > 0:
        i0, i1 = stratified_bootstrap(n0, n1, B, torch.Generator(device="cpu").manual_seed(seed))
        W0 = torch.cat([W0, index_counts(i0.to(device), n0)])
        W1 = torch.cat([W1, index_counts(i1.to(device), n1)])
    return W0, W1


def _metric_value(
    point: float, reps: Tensor | None, ci_level: float, ci_method: Literal["percentile", "bc"], note: str = ""
) -> MetricValue:
    """One metric's value: its point estimate, bootstrap interval from ``reps`` and status (``degraded`` with
    ``note``, a non-finite point or non-finite resamples)."""
    status, msgs = ("degraded", [note]) if note else ("ok", [])
    lo = hi = None
    if not math.isfinite(point):
        return MetricValue(None, None, None, "degraded", "; ".join(msgs + ["not finite (singular data)"]))
    if reps is not None:
        lo_f, hi_f, n_bad = bootstrap_interval(reps, point, ci_level, ci_method)
        lo, hi = _finite_or_none(lo_f), _finite_or_none(hi_f)
        if n_bad:
            status = "degraded"
            msgs.append(f"{n_bad} of {reps.numel()} bootstrap resamples not finite")
    return MetricValue(point, lo, hi, status, "; ".join(msgs))


def _put_moment_metrics(
    put: Callable[..., None],
    want: set[str],
    Z0: Tensor,
    Z1: Tensor,
    W0: Tensor,
    W1: Tensor,
    shrinkage: Shrinkage,
    B: int,
) -> None:
    """The moment metrics in PCA space (Bhattacharyya, centroid distance, between-variance ratio)."""
    moment_names = [m for m in ("bhattacharyya", "centroid_distance", "between_var_ratio") if m in want]
    if not moment_names:
        return
    n0, n1, k = Z0.shape[0], Z1.shape[0], Z0.shape[1]
    mom = moment_metrics(Z0, Z1, W0, W1, shrinkage)
    small = min(n0, n1) <= k
    for m in moment_names:
        note = ""
        if m == "bhattacharyya" and small:
            note = f"a class has {min(n0, n1)} items in {k} PCA dimensions: its covariance is rank-deficient " + (
                "and held finite only by shrinkage"
                if shrinkage_label(shrinkage) != "none"
                else "and the closed form undefined (options.shrinkage: ledoit_wolf keeps it finite)"
            )
        put(m, float(mom[m][0]), mom[m][1:] if B > 0 else None, note)


def _put_full_space_metrics(
    put: Callable[..., None],
    out: dict[str, MetricValue],
    want: set[str],
    X: Tensor | None,
    y: Tensor,
    Z0: Tensor,
    Z1: Tensor,
    W0: Tensor,
    W1: Tensor,
    B: int,
) -> None:
    """The full-space metrics (between-variance ratio of the full vectors, PCA explained variance); skipped
    without ``X``."""
    if X is None:
        for m in FULL_SPACE_METRICS & want:
            out[m] = MetricValue(None, None, None, "skipped", "full-dimensional vectors not given")
        return
    n0, n1 = Z0.shape[0], Z1.shape[0]
    yX = y.to(X.device)
    X0, X1 = X[yX == 0], X[yX == 1]
    boot_full = B > 0 and "between_var_ratio_full" in want
    W0f, W1f = (W0, W1) if boot_full else (W0[:1], W1[:1])
    between, total = weighted_between_parts(X0, X1, W0f, W1f)
    nan = torch.full_like(total, float("nan"))
    ratio = torch.where(total > 0, between / total.clamp_min(1e-300), nan)
    if "between_var_ratio_full" in want:
        put("between_var_ratio_full", float(ratio[0]), ratio[1:] if boot_full else None)
    if "pca_explained_variance" in want:
        zall = torch.cat([Z0, Z1])
        inside = float(((zall - zall.mean(0)) ** 2).sum()) / (n0 + n1)
        tot = float(total[0])
        put("pca_explained_variance", inside / tot if tot > 0 else float("nan"), None)


def _probe_metric(
    feats: Tensor | None,
    y: Tensor,
    n0: int,
    n1: int,
    probe_folds: int,
    probe_C: float,
    seed: int,
    ci_level: float,
) -> MetricValue:
    """The linear probe's pooled out-of-fold accuracy with its Wilson interval; skipped without features or
    with fewer than 2 items in a class."""
    folds = min(probe_folds, n0, n1)
    if feats is None:
        return MetricValue(None, None, None, "skipped", "full-dimensional vectors not given")
    if folds < 2:
        return MetricValue(None, None, None, "skipped", "probe needs >= 2 items per class")
    res = probe_cv_accuracy(feats, y, folds=folds, C=probe_C, seed=seed)
    lo, hi = wilson_interval(res.n_correct, res.n, ci_level)
    note = f"{folds}-fold instead of {probe_folds}-fold (small class)" if folds < probe_folds else ""
    return MetricValue(res.accuracy, lo, hi, "degraded" if note else "ok", note)
