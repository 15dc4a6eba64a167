"""The MLC head's options and the monitor that says when the head, not the model, carries the MLC loss."""

import math

import pytest
import torch

from raysafe.train.config import TrainConfig
from raysafe.train.mlc import ABSORB_LIMIT, MLCHead, head_monitor, mlc_loss, mlc_loss_floor
from raysafe.train.worker import AlignModule, param_groups


def language_states(b=16, m=6, hidden=32, seed=0):
    """Hidden states whose languages differ (no cross-lingual agreement to find)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, hidden, generator=g) + 0.5 * torch.randn(1, 1, hidden, generator=g)


@pytest.mark.parametrize("form,eps", [("released", 0.0), ("released", 1e-6), ("plain", 0.0)])
def test_loss_floor_is_the_loss_of_collinear_rows(form, eps):
    z = torch.randn(3, 1, 8).repeat(1, 5, 1) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5]).view(1, 5, 1)
    assert float(mlc_loss(z, eps=eps, form=form).loss) == pytest.approx(mlc_loss_floor(5, eps=eps, form=form), abs=1e-5)
    assert float(mlc_loss(torch.randn(3, 5, 8), eps=eps, form=form).loss) > mlc_loss_floor(5, eps=eps, form=form) + 0.05


def test_bias_only_head_reaches_the_floor_and_is_flagged():
    h = language_states()
    head = MLCHead(32, 16, "linear")
    with torch.no_grad():
        head.proj.weight.zero_()
    head.proj.weight.requires_grad_(False)
    opt = torch.optim.Adam([head.proj.bias], lr=0.05)
    for _ in range(20):
        loss = mlc_loss(head(h)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) == pytest.approx(mlc_loss_floor(6), abs=1e-4)
    mon = head_monitor(head, h)
    assert mon["head/bias_share"] == pytest.approx(1.0) and mon["head/absorbing"] == 1.0
    assert mon["head/rank1_z"] == pytest.approx(1.0, abs=1e-5) and mon["head/rank1_h"] < 0.5


def test_a_head_trained_hard_collapses_its_weight_and_is_flagged():
    h = language_states()
    head = MLCHead(32, 16, "linear")
    assert head_monitor(head, h)["head/absorbing"] == 0.0  # at initialisation
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        loss = mlc_loss(head(h)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    mon = head_monitor(head, h)
    assert float(loss.detach()) < mlc_loss_floor(6) + 1e-3  # at the floor, while h is as inconsistent as before
    assert mon["head/w_rank1"] > ABSORB_LIMIT and mon["head/absorbing"] == 1.0
    assert mon["head/rank1_h_centred"] < 0.5


def test_frozen_random_head_has_nothing_to_train_and_is_not_flagged():
    h = language_states()
    head = MLCHead(32, 16, "frozen_random")
    assert not any(p.requires_grad for p in head.parameters()) and head.proj.bias is None
    w = head.proj.weight
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)  # orthonormal rows: lengths and angles kept
    mon = head_monitor(head, h)
    assert mon["head/absorbing"] == 0.0 and mon["head/bias_share"] == 0.0
    assert mon["head/w_rank1"] == pytest.approx(1 / 16, rel=1e-4)
    assert MLCHead(32, 16, "linear_nobias").proj.bias is None


def test_head_kind_survives_save_and_load(tmp_path):
    head = MLCHead(32, 16, "frozen_random", seed=3)
    head.save(tmp_path)
    back = MLCHead.load(tmp_path)
    assert back.kind == "frozen_random" and torch.equal(back.proj.weight, head.proj.weight)


def test_head_learning_rate_is_its_own_group():
    cfg = TrainConfig.model_validate(
        {"model": {"path": "x"}, "optim": {"lr": 1e-4}, "mlc": {"head": "linear", "head_lr_scale": 0.01}}
    )
    policy = torch.nn.Linear(4, 4)
    module = AlignModule(policy, MLCHead(4, 3), cfg, 1)
    groups = param_groups(module, cfg)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-6)]
    assert sum(len(g["params"]) for g in groups) == 4
    frozen = TrainConfig.model_validate({"model": {"path": "x"}, "mlc": {"head": "frozen_random"}})
    assert len(param_groups(AlignModule(policy, MLCHead(4, 3, "frozen_random"), frozen, 1), frozen)) == 1


def test_floor_formula_by_hand():
    m, tau = 4, 0.2
    assert mlc_loss_floor(m, tau) == pytest.approx(math.log(math.exp(1 / tau) + m - 1) - 1 / tau)
