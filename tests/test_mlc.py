"""MLC loss: known extremes, the two forms, gradients (gradcheck incl. degenerate inputs), head, config, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from raysafe.consistency import mlc_diagnostics, normalise_rows
from raysafe.errors import ConfigError, ModelError
from raysafe.train.config import MLCConfig
from raysafe.train.mlc import (
    MLCHead,
    MLCSchedule,
    consistency_loss,
    mlc_loss,
    pairwise_cosine_loss,
    singular_values,
)

TAU, EPS = 0.2, 1e-6


def collinear(b=2, m=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, 1, d, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 2.5, -0.5, 3.0, 0.7, 1.1][:m], dtype=torch.float64).view(1, m, 1)
    return v * scales


def orthonormal(b=2, m=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, d, m, generator=g, dtype=torch.float64))
    return q.transpose(-1, -2)  # rows orthonormal


def released_value(sigma, tau=TAU, eps=EPS):
    s1 = sigma[0]
    return -(s1 / (tau * s1) - math.log(sum(math.exp(s / (tau * s1 + eps)) for s in sigma)))


def released_code_loss(z, tau=TAU):
    """The authors' released MLC loss, transcribed from github.com/Yuyan-B/MLC src/llamafactory/train/dpo/trainer.py
    (``_compute_aux_loss``): rows normalised with +1e-12, SVD in float32, singular values divided by the detached
    top one (+1e-12), over τ, cross-entropy with target 0."""
    zc = z / (z.norm(dim=-1, keepdim=True) + 1e-12)
    svals = torch.linalg.svd(zc.to(torch.float32), full_matrices=False)[1]
    stop = svals[..., :1].detach()
    logits = (svals / (stop + 1e-12) / tau).reshape(-1, svals.size(-1))
    return torch.nn.functional.cross_entropy(logits, torch.zeros(logits.size(0), dtype=torch.long))


def test_default_is_the_released_code_loss_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 16, generator=g)
    ours = z.clone().requires_grad_(True)
    ref = z.clone().requires_grad_(True)
    mine = mlc_loss(ours).loss  # defaults: tau 0.2, eps 0, released form
    theirs = released_code_loss(ref)
    mine.backward()
    theirs.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)
    assert MLCConfig().eps == 0.0


def test_eps_lowers_the_loss_by_its_documented_bound():
    z = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    base = mlc_loss(z, TAU, 0.0).loss.item()
    shifted = mlc_loss(z, TAU, 1e-3).loss.item()
    assert 0.0 < base - shifted <= 1e-3 / TAU**2


def plain_value(sigma, tau=TAU):
    return -(sigma[0] / tau - math.log(sum(math.exp(s / tau) for s in sigma)))


@pytest.mark.parametrize("form,value", [("released", released_value), ("plain", plain_value)])
def test_extremes_have_closed_form_values(form, value):
    m = 4
    low = mlc_loss(collinear(m=m), TAU, EPS, form).loss.item()
    high = mlc_loss(orthonormal(m=m), TAU, EPS, form).loss.item()
    assert low == pytest.approx(value([math.sqrt(m), 0.0, 0.0, 0.0]), abs=1e-9)
    assert high == pytest.approx(value([1.0] * m), abs=1e-9)
    if form == "plain":
        assert high == pytest.approx(math.log(m), abs=1e-12)


@pytest.mark.parametrize("form", ["released", "plain"])
def test_collinear_is_minimum_orthonormal_is_maximum(form):
    low = mlc_loss(collinear(b=1), form=form).loss.item()
    high = mlc_loss(orthonormal(b=1), form=form).loss.item()
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        z = torch.randn(1, 4, 8, generator=g, dtype=torch.float64) + 2.0 * torch.rand(1, 1, 8, generator=g)
        v = mlc_loss(z, form=form).loss.item()
        assert low - 1e-9 <= v <= high + 1e-9


def test_forms_agree_on_ordering_along_a_path_from_collinear_to_orthonormal():
    a, b = collinear(b=1), orthonormal(b=1)
    a = normalise_rows(a)
    path = [normalise_rows((1 - t) * a + t * b) for t in torch.linspace(0, 1, 11).tolist()]
    released = [mlc_loss(z, form="released").loss.item() for z in path]
    plain = [mlc_loss(z, form="plain").loss.item() for z in path]
    assert all(x < y for x, y in zip(released, released[1:]))
    assert all(x < y for x, y in zip(plain, plain[1:]))


def test_singular_values_match_svdvals_and_float32():
    z = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    s = singular_values(z)
    assert s.dtype == torch.float32 and s.shape == (3, 5)
    torch.testing.assert_close(s, torch.linalg.svdvals(z.float()))
    assert singular_values(torch.randn(2, 6, 3)).shape == (2, 3)  # m > d: min(m, d) values


@pytest.mark.parametrize(
    "z",
    [
        torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        collinear(b=1, m=3, d=5),  # identical rows up to scale: repeated zero singular values
        torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),  # m > d
    ],
    ids=["random", "identical_rows", "m_gt_d"],
)
def test_gradcheck_singular_values_and_plain_form(z):
    z = z.clone().requires_grad_(True)
    w = torch.linspace(1.0, -0.5, min(z.shape[-2:]), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (singular_values(x) * w).sum(), (z,), atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: mlc_loss(x, form="plain").loss, (z,), atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: pairwise_cosine_loss(x).loss, (z,), atol=1e-5)


@pytest.mark.parametrize(
    "z",
    [
        torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        collinear(b=1, m=3, d=5),
        torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
    ],
    ids=["random", "identical_rows", "m_gt_d"],
)
def test_released_form_gradient_is_that_of_the_frozen_scale_surrogate(z):
    """sg(σ₁) makes the released loss's gradient the derivative of the same formula with σ₁ frozen in the scale."""
    frozen = singular_values(normalise_rows(z.detach()))[:, :1]

    def surrogate(x):
        s = singular_values(normalise_rows(x))
        per_item = torch.logsumexp(s / (TAU * frozen + EPS), -1) - s[:, 0] / (TAU * frozen[:, 0])
        return per_item.mean()

    x = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(surrogate, (x,), atol=1e-5)
    mlc_loss(x, TAU, EPS, "released").loss.backward()
    y = z.clone().requires_grad_(True)
    surrogate(y).backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("form", ["released", "plain"])
def test_gradients_finite_in_float32_degenerate_cases(form):
    cases = [
        torch.ones(2, 5, 16),  # identical rows
        orthonormal(m=4, d=4).float(),  # all singular values equal
        torch.randn(2, 12, 4),  # m > d
        torch.cat([torch.zeros(1, 1, 8), torch.randn(1, 3, 8)], 1),  # a zero row
    ]
    for z in cases:
        z = z.clone().requires_grad_(True)
        out = mlc_loss(z, form=form)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("form", ["released", "plain"])
def test_sgd_decreases_the_loss_and_raises_rank1_energy(form):
    torch.manual_seed(0)
    hidden = torch.randn(4, 5, 32)
    head = MLCHead(32, d=16)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = mlc_loss(head(hidden), form=form)
    for _ in range(15):
        opt.zero_grad()
        mlc_loss(head(hidden), form=form).loss.backward()
        opt.step()
    last = mlc_loss(head(hidden), form=form)
    assert last.loss.item() < first.loss.item() - 0.05
    assert last.metrics["mlc/rank1_energy"].item() > first.metrics["mlc/rank1_energy"].item()


def test_pairwise_cosine_and_diagnostics():
    c, o = collinear(m=4).abs(), orthonormal(m=4)
    assert pairwise_cosine_loss(c).loss.item() == pytest.approx(0.0, abs=1e-12)
    assert pairwise_cosine_loss(o).loss.item() == pytest.approx(1.0, abs=1e-12)
    d = mlc_diagnostics(c, hidden=o)
    assert d["rank1_energy"] == pytest.approx(1.0)
    assert d["cosine_z"] == pytest.approx(1.0)
    assert d["cosine_hidden"] == pytest.approx(0.0, abs=1e-12)
    assert d["spectrum"] == pytest.approx([2.0, 0.0, 0.0, 0.0], abs=1e-6)
    d = mlc_diagnostics(o)
    assert d["rank1_energy"] == pytest.approx(0.25) and "cosine_hidden" not in d
    assert d["spectrum"] == pytest.approx([1.0] * 4)


def test_bad_inputs():
    with pytest.raises(ValueError):
        mlc_loss(torch.randn(2, 1, 4))
    with pytest.raises(ConfigError):
        mlc_loss(torch.randn(2, 3, 4), form="other")
    with pytest.raises(ConfigError):
        mlc_loss(torch.randn(2, 3, 4), tau=0.0)


def test_head_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    head = MLCHead(24, d=12)
    path = head.save(tmp_path / "ckpt")
    assert path.name == "mlc_head.safetensors" and (tmp_path / "ckpt" / "mlc_head.json").is_file()
    loaded = MLCHead.load(tmp_path / "ckpt")
    assert (loaded.hidden, loaded.d) == (24, 12)
    x = torch.randn(3, 24)
    torch.testing.assert_close(loaded(x), head(x), atol=0, rtol=0)
    with pytest.raises(ModelError):
        MLCHead.load(tmp_path / "nothing")
    (tmp_path / "ckpt" / "mlc_head.json").write_text('{"hidden": 24, "d": 13}')
    with pytest.raises(ModelError, match="do not match"):
        MLCHead.load(tmp_path / "ckpt")


def test_config_schedule_and_dispatch():
    cfg = MLCConfig()
    assert (cfg.d, cfg.tau, cfg.weight, cfg.every_k, cfg.form, cfg.kind) == (512, 0.2, 0.8, 2, "released", "mlc")
    assert MLCConfig(layer=0.5).resolve_layer(18) == 9
    assert MLCConfig(layer=1.0).resolve_layer(18) == 18
    assert MLCConfig(layer=0.01).resolve_layer(18) == 1
    assert MLCConfig(layer=0).resolve_layer(18) == 0
    with pytest.raises(ConfigError):
        MLCConfig(layer=19).resolve_layer(18)
    with pytest.raises(ConfigError):
        MLCConfig(layer=1.5).resolve_layer(18)
    with pytest.raises(ValidationError):
        MLCConfig(pooling="max")
    with pytest.raises(ValidationError):
        MLCConfig(lamda=0.8)
    sched = cfg.schedule()
    assert [sched.active(s) for s in range(5)] == [True, False, True, False, True]
    assert all(MLCSchedule(1).active(s) for s in range(3))
    with pytest.raises(ConfigError):
        MLCSchedule(0)
    z = orthonormal(m=3)
    assert consistency_loss(z, MLCConfig(kind="cosine")).loss.item() == pytest.approx(1.0)
    assert consistency_loss(z, MLCConfig(form="plain")).loss.item() == pytest.approx(math.log(3))
