"""Alignment losses against independent float64 references written with plain math, plus limits and dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysafe.errors import ConfigError
from raysafe.train.losses import (
    ALIGNMENT_LOSSES,
    LossOutput,
    alignment_loss,
    dpo_loss,
    needs_reference,
    orpo_loss,
    sft_loss,
    simpo_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _random(n=16, seed=0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-40.0, 15.0, n) for _ in range(4))
    return pc, pr, rc, rr


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def ref_dpo(pc, pr, rc, rr, beta, eps, kind, nc=None, nr=None):
    out = []
    for i in range(len(pc)):
        d = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if kind == "sigmoid":
            v = -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
        elif kind == "robust":
            v = (-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps)
        elif kind == "ipo":
            if nc is not None:
                d = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            v = (d - 1 / (2 * beta)) ** 2
        else:
            v = max(0.0, 1 - beta * d)
        out.append(v)
    return sum(out) / len(out)


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "ipo", "hinge"])
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_matches_reference(kind, beta, eps):
    pc, pr, rc, rr = _random()
    out = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, label_smoothing=eps, kind=kind)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(ref_dpo(pc, pr, rc, rr, beta, eps, kind), abs=1e-6)
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(chosen.mean(), abs=1e-9)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(rejected.mean(), abs=1e-9)
    assert out.metrics["rewards/margins"].item() == pytest.approx((chosen - rejected).mean(), abs=1e-9)
    assert out.metrics["rewards/accuracy"].item() == pytest.approx((chosen > rejected).mean(), abs=1e-9)


def test_ipo_length_normalised():
    pc, pr, rc, rr = _random()
    rng = np.random.default_rng(3)
    nc, nr = rng.integers(1, 50, 16), rng.integers(1, 50, 16)
    out = dpo_loss(
        t(pc),
        t(pr),
        t(rc),
        t(rr),
        beta=0.1,
        kind="ipo",
        chosen_ntokens=torch.tensor(nc),
        rejected_ntokens=torch.tensor(nr),
    )
    assert out.loss.item() == pytest.approx(ref_dpo(pc, pr, rc, rr, 0.1, 0.0, "ipo", nc, nr), abs=1e-6)


def test_dpo_limits():
    pc, pr, rc, rr = _random()
    # identical policy and reference: zero margin
    same = dpo_loss(t(pc), t(pr), t(pc), t(pr), beta=0.1)
    assert same.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert dpo_loss(t(pc), t(pr), t(pc), t(pr), kind="hinge").loss.item() == pytest.approx(1.0)
    assert dpo_loss(t(pc), t(pr), t(pc), t(pr), beta=0.1, kind="ipo").loss.item() == pytest.approx(25.0)
    assert dpo_loss(t(pc), t(pr), t(pc), t(pr), label_smoothing=0.3, kind="robust").loss.item() == pytest.approx(
        math.log(2), abs=1e-12
    )
    # beta -> 0: sigmoid DPO tends to log 2 whatever the margins
    assert dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=1e-9).loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # a large positive margin drives the sigmoid loss to 0, a large negative one grows linearly
    big = torch.full((4,), 1000.0, dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    assert dpo_loss(big, zero, zero, zero, beta=1.0).loss.item() == pytest.approx(0.0, abs=1e-12)
    assert dpo_loss(zero, big, zero, zero, beta=1.0).loss.item() == pytest.approx(1000.0, rel=1e-9)


def test_dpo_gradient_pushes_chosen_up():
    pc = torch.zeros(3, requires_grad=True)
    pr = torch.zeros(3, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(3), torch.zeros(3)).loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_reference(beta, gamma, eps):
    rng = np.random.default_rng(1)
    c, r = rng.normal(-1.5, 0.7, 16), rng.normal(-1.8, 0.7, 16)
    out = simpo_loss(t(c), t(r), beta=beta, gamma=gamma, label_smoothing=eps)
    ref = np.mean(
        [
            -(1 - eps) * log_sigmoid(beta * (a - b) - gamma) - eps * log_sigmoid(-(beta * (a - b) - gamma))
            for a, b in zip(c, r)
        ]
    )
    assert out.loss.item() == pytest.approx(ref, abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(beta * c.mean(), abs=1e-9)
    # zero margin: -log sigma(-gamma)
    assert simpo_loss(t(c), t(c), beta=beta, gamma=gamma).loss.item() == pytest.approx(-log_sigmoid(-gamma))
    # beta -> 0 with gamma = 0: log 2
    assert simpo_loss(t(c), t(r), beta=1e-9, gamma=0.0).loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_orpo_matches_reference():
    rng = np.random.default_rng(2)
    c, r = -rng.uniform(0.01, 4.0, 16), -rng.uniform(0.01, 4.0, 16)
    nll = 1.7
    beta = 0.1

    def log_odds(p):
        return p - math.log(1 - math.exp(p))

    ref = nll - beta * np.mean([log_sigmoid(log_odds(a) - log_odds(b)) for a, b in zip(c, r)])
    out = orpo_loss(t(c), t(r), torch.tensor(nll, dtype=torch.float64), beta=beta)
    assert out.loss.item() == pytest.approx(ref, abs=1e-6)
    assert out.metrics["nll"].item() == pytest.approx(nll)
    # equal chosen and rejected: odds ratio 1 -> NLL + beta log 2
    assert orpo_loss(t(c), t(c), t(nll), beta=beta).loss.item() == pytest.approx(nll + beta * math.log(2))
    # per-pair NLL is averaged
    per = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert orpo_loss(t(c[:2]), t(c[:2]), per).metrics["nll"].item() == pytest.approx(2.0)


def test_orpo_stable_for_extreme_probabilities():
    c = torch.tensor([-1e-9, -200.0], dtype=torch.float32, requires_grad=True)
    r = torch.tensor([-200.0, -1e-9], dtype=torch.float32, requires_grad=True)
    out = orpo_loss(c, r, torch.tensor(0.0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_sft_token_level_mean():
    s = t([-10.0, -30.0])
    n = torch.tensor([5, 10])
    assert sft_loss(s, n).loss.item() == pytest.approx(40.0 / 15.0)


def test_registry_and_dispatch():
    assert set(ALIGNMENT_LOSSES) == {"dpo", "simpo", "orpo", "sft"}
    assert needs_reference("dpo") and not needs_reference("simpo") and not needs_reference("orpo")
    assert not needs_reference("sft")
    with pytest.raises(ConfigError):
        needs_reference("kto")
    pc, pr, rc, rr = _random(4)
    n = torch.tensor([10, 20, 30, 40])
    common = dict(chosen_logps=t(pc), rejected_logps=t(pr), chosen_ntok=n, rejected_ntok=n)
    got = alignment_loss("dpo", **common, ref_chosen_logps=t(rc), ref_rejected_logps=t(rr), beta=0.2)
    assert got.loss.item() == pytest.approx(ref_dpo(pc, pr, rc, rr, 0.2, 0.0, "sigmoid"), abs=1e-9)
    got = alignment_loss("dpo", **common, ref_chosen_logps=t(rc), ref_rejected_logps=t(rr), kind="ipo")
    assert got.loss.item() == pytest.approx(ref_dpo(pc, pr, rc, rr, 0.1, 0.0, "ipo", n.numpy(), n.numpy()), abs=1e-9)
    got = alignment_loss("simpo", **common, beta=2.0, gamma=0.5)
    assert got.loss.item() == pytest.approx(simpo_loss(t(pc) / n, t(pr) / n).loss.item())
    got = alignment_loss("orpo", **common)
    expected_nll = -pc.sum() / n.sum().item()
    assert got.metrics["nll"].item() == pytest.approx(expected_nll)
    assert alignment_loss("sft", **common).loss.item() == pytest.approx(expected_nll)
    with pytest.raises(ConfigError, match="reference"):
        alignment_loss("dpo", **common)
    with pytest.raises(ConfigError, match="gamma"):
        alignment_loss("dpo", **common, ref_chosen_logps=t(rc), ref_rejected_logps=t(rr), gamma=1.0)


def test_bad_settings_and_shapes():
    x = torch.zeros(3)
    with pytest.raises(ConfigError):
        dpo_loss(x, x, x, x, kind="kto")
    with pytest.raises(ConfigError):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ConfigError):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(x, torch.zeros(4), x, x)
