"""The loss registry: entries declare their needs, a new loss is one function plus one entry, and ORPO's two NLL
normalisations (TRL's token-level mean, LLaMA-Factory's per-sequence mean) against a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysafe.config import load_config
from raysafe.errors import ConfigError
from raysafe.train import losses
from raysafe.train.config import LossSpec, TrainConfig
from raysafe.train.losses import ALIGNMENT_LOSSES, AlignmentLossSpec, LossOutput, alignment_loss, chosen_nll


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_orpo(sc, sr, nc, nr, beta, normalisation):
    """ORPO written from the formula with Python floats: p̄ = s/n, log odds(p̄) = p̄ − log(1 − e^p̄),
    L = NLL − β · mean_b log σ(log odds(p̄_w) − log odds(p̄_l))."""
    if normalisation == "token":
        nll = -sum(sc) / sum(nc)
    else:
        nll = sum(-s / n for s, n in zip(sc, nc)) / len(sc)

    def log_odds(p):
        return p - math.log(1 - math.exp(p))

    ratio = [log_sigmoid(log_odds(a / m) - log_odds(b / k)) for a, m, b, k in zip(sc, nc, sr, nr)]
    return nll - beta * sum(ratio) / len(ratio), nll


def _pairs(seed=4, n=12):
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(1, 60, n), rng.integers(1, 60, n)
    sc = -rng.uniform(0.05, 3.0, n) * nc  # per-token means in (−3, −0.05)
    sr = -rng.uniform(0.05, 3.0, n) * nr
    return sc, sr, nc, nr


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_nll_normalisations_match_the_formula(normalisation, beta):
    sc, sr, nc, nr = _pairs()
    spec = LossSpec(name="orpo", beta=beta, nll_normalisation=normalisation)
    got = alignment_loss(
        "orpo",
        chosen_logps=torch.tensor(sc, dtype=torch.float64),
        rejected_logps=torch.tensor(sr, dtype=torch.float64),
        chosen_ntok=torch.tensor(nc),
        rejected_ntok=torch.tensor(nr),
        **spec.params(),
    )
    want, nll = ref_orpo(sc, sr, nc, nr, beta, normalisation)
    assert got.loss.item() == pytest.approx(want, abs=1e-10)
    assert got.metrics["nll"].item() == pytest.approx(nll, abs=1e-10)


def test_the_two_normalisations_differ_only_when_lengths_differ():
    sc, _, nc, _ = _pairs()
    s, n = torch.tensor(sc, dtype=torch.float64), torch.tensor(nc)
    token, sequence = chosen_nll(s, n, "token"), chosen_nll(s, n, "sequence").mean()
    assert abs(token.item() - sequence.item()) > 1e-3  # lengths 1..59: the weighting matters
    same = torch.full_like(n, 7)
    assert chosen_nll(s, same, "token").item() == pytest.approx(chosen_nll(s, same, "sequence").mean().item())
    with pytest.raises(ConfigError, match="nll_normalisation"):
        chosen_nll(s, n, "word")


def test_default_orpo_keeps_trl_token_mean():
    assert LossSpec(name="orpo").params() == {"beta": 0.1, "nll_normalisation": "token"}


def test_params_follow_the_registry_entry():
    assert LossSpec(name="dpo", kind="ipo").params() == {"beta": 0.1, "label_smoothing": 0.0, "kind": "ipo"}
    assert LossSpec(name="simpo", beta=2.0).params() == {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}
    assert LossSpec(name="sft").params() == {}


def test_unknown_loss_name_is_a_config_error_naming_the_field(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: {path: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, cfg, ["loss.name=kto"])
    assert "loss.name" in str(e.value) and "kto" in str(e.value) and "orpo" in str(e.value)


def test_a_new_loss_is_one_function_and_one_entry(monkeypatch):
    """Registering a loss makes it valid in the config and dispatched with exactly the inputs its entry declares."""
    seen = {}

    def margin_loss(chosen_mean, rejected_mean, ref_chosen, ref_rejected, nll, chosen_ntokens, rejected_ntokens, beta):
        seen.update(cm=chosen_mean, rc=ref_chosen, nll=nll, n=chosen_ntokens, beta=beta)
        return LossOutput((chosen_mean - rejected_mean).mean() + nll.mean())

    entry = AlignmentLossSpec(
        "margin",
        margin_loss,
        ("beta", "nll_normalisation"),
        needs_reference=True,
        length_normalised=True,
        sft_term=True,
        token_counts=True,
    )
    monkeypatch.setitem(ALIGNMENT_LOSSES, "margin", entry)
    spec = LossSpec(name="margin", beta=0.3, nll_normalisation="sequence")
    assert losses.needs_reference("margin")
    s = torch.tensor([-4.0, -9.0], dtype=torch.float64)
    n = torch.tensor([2, 3])
    ref = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    out = alignment_loss(
        "margin",
        chosen_logps=s,
        rejected_logps=s * 2,
        chosen_ntok=n,
        rejected_ntok=n,
        ref_chosen_logps=ref,
        ref_rejected_logps=ref,
        **spec.params(),
    )
    torch.testing.assert_close(seen["cm"], torch.tensor([-2.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(seen["rc"], ref)
    torch.testing.assert_close(seen["nll"], torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert seen["beta"] == 0.3 and torch.equal(seen["n"], n)
    assert out.loss.item() == pytest.approx(2.5 + 2.5)  # mean(p̄_w − p̄_l) + mean per-sequence NLL
    with pytest.raises(ConfigError, match="reference"):
        alignment_loss("margin", chosen_logps=s, rejected_logps=s, chosen_ntok=n, rejected_ntok=n)
