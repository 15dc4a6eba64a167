"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Every function takes 1-D tensors with one entry per preference pair and returns a :class:`LossOutput`: the scalar
loss (mean over pairs) and metrics. Rewards are detached and follow TRL's conventions:

- DPO: ``r = β · (log π(y|x) − log π_ref(y|x))`` (summed log-probs);
- SimPO / ORPO: ``r = β · mean-token log π(y|x)`` (length-normalised, no reference model).

``rewards/accuracy`` is the share of pairs with ``r_chosen > r_rejected``. The formulas are written out in
docs/losses.md. :data:`ALIGNMENT_LOSSES` maps a loss name to its function and tells whether it needs reference
log-probabilities; :func:`alignment_loss` dispatches by name from the outputs of one policy forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raysafe.errors import ConfigError

DPO_KINDS = ("sigmoid", "robust", "ipo", "hinge")


@dataclass
class LossOutput:
    """A scalar loss and the metrics that describe it (floats or detached 0-d tensors)."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


def _check_pairs(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of equal length (one entry per pair), got {shapes}")


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
    chosen_ntokens: torch.Tensor | None = None,
    rejected_ntokens: torch.Tensor | None = None,
) -> LossOutput:
    """Direct Preference Optimisation on summed log-probs of the policy and the reference model.

    With ``Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`` and ``ε = label_smoothing``:

    - ``sigmoid`` (cDPO when ε > 0): ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``
    - ``robust`` (rDPO, ε ∈ [0, 0.5)): ``(−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)``
    - ``ipo``: ``(Δ' − 1/(2β))²`` where ``Δ'`` is Δ with each log-ratio divided by its token count when
      ``chosen_ntokens``/``rejected_ntokens`` are given (TRL's length-normalised IPO), else ``Δ' = Δ``
    - ``hinge``: ``max(0, 1 − βΔ)``

    The loss is the mean over pairs.
    """
    _check_pairs(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    if kind not in DPO_KINDS:
        raise ConfigError(f"unknown DPO loss kind {kind!r}", where="loss.kind", fix=f"use one of {DPO_KINDS}")
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}", where="loss.beta")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}", where="loss.label_smoothing")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if kind == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif kind == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif kind == "ipo":
        if (chosen_ntokens is None) != (rejected_ntokens is None):
            raise ValueError("give both chosen_ntokens and rejected_ntokens for length-normalised IPO, or neither")
        if chosen_ntokens is not None and rejected_ntokens is not None:
            delta_ipo = chosen_ratio / chosen_ntokens.clamp(min=1).to(delta.dtype) - rejected_ratio / (
                rejected_ntokens.clamp(min=1).to(delta.dtype)
            )
        else:
            delta_ipo = delta
        losses = (delta_ipo - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * delta)
    metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio)
    metrics["logps/chosen"] = policy_chosen.detach().mean()
    metrics["logps/rejected"] = policy_rejected.detach().mean()
    return LossOutput(losses.mean(), metrics)


def simpo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al., 2024) on length-normalised (mean per-token) policy log-probs, no reference model.

    ``u = β·(mean log π(y_w) − mean log π(y_l)) − γ``; loss ``−(1−ε)·log σ(u) − ε·log σ(−u)``, mean over pairs.
    ``gamma`` is the target reward margin γ itself (as in TRL's ``simpo_gamma``), not the ratio γ/β: the SimPO
    repository's ``gamma_beta_ratio = 0.5`` with ``β = 2`` corresponds to ``gamma = 1.0`` here.
    """
    _check_pairs(policy_chosen_mean=policy_chosen_mean, policy_rejected_mean=policy_rejected_mean)
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}", where="loss.beta")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}", where="loss.label_smoothing")
    u = beta * (policy_chosen_mean - policy_rejected_mean) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    metrics = _reward_metrics(beta * policy_chosen_mean, beta * policy_rejected_mean)
    return LossOutput(losses.mean(), metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable near 0 and for very negative ``x`` (Mächler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO (Hong et al., 2024): NLL on the chosen answer plus an odds-ratio preference term.

    With length-normalised log-probs ``p = mean log π(y|x)`` and ``log odds(y) = p − log(1 − exp(p))``:
    ``L = mean(chosen_nll) − β · mean_pairs log σ(log odds(y_w) − log odds(y_l))``. ``chosen_nll`` is the NLL of the
    chosen answers: a scalar (token-level mean over the batch, as TRL computes it) or one value per pair.
    ``mean_logps`` are clamped below −1e-6 so the odds stay finite when a probability rounds to 1.
    """
    _check_pairs(chosen_mean_logps=chosen_mean_logps, rejected_mean_logps=rejected_mean_logps)
    if beta <= 0:
        raise ConfigError(f"beta must be > 0, got {beta}", where="loss.beta")
    pc = chosen_mean_logps.clamp(max=-1e-6)
    pr = rejected_mean_logps.clamp(max=-1e-6)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll.mean()
    loss = nll - beta * ratio.mean()
    metrics = _reward_metrics(beta * chosen_mean_logps, beta * rejected_mean_logps)
    metrics["nll"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return LossOutput(loss, metrics)


def sft_loss(chosen_sum_logps: torch.Tensor, chosen_ntokens: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning on the chosen answers: token-level mean NLL ``−Σ_b sum_logps_b / Σ_b n_b``.

    Longer answers weigh more (the usual causal-LM cross-entropy over all answer tokens of the batch). Only the
    NLL metric is reported (there is no rejected side).
    """
    _check_pairs(chosen_sum_logps=chosen_sum_logps, chosen_ntokens=chosen_ntokens)
    total = chosen_ntokens.sum().clamp(min=1).to(chosen_sum_logps.dtype)
    loss = -chosen_sum_logps.sum() / total
    return LossOutput(loss, {"nll": loss.detach()})


@dataclass(frozen=True)
class AlignmentLossSpec:
    """How to compute one alignment loss from a policy forward pass (and reference log-probs if needed)."""

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    #: Names of the keyword hyper-parameters the loss accepts (``beta``, ``gamma``, ...).
    params: tuple[str, ...]


ALIGNMENT_LOSSES: dict[str, AlignmentLossSpec] = {
    "dpo": AlignmentLossSpec("dpo", dpo_loss, True, ("beta", "label_smoothing", "kind")),
    "simpo": AlignmentLossSpec("simpo", simpo_loss, False, ("beta", "gamma", "label_smoothing")),
    "orpo": AlignmentLossSpec("orpo", orpo_loss, False, ("beta",)),
    "sft": AlignmentLossSpec("sft", sft_loss, False, ()),
}


def needs_reference(name: str) -> bool:
    """Whether the alignment loss ``name`` needs reference-model log-probabilities."""
    return _spec(name).needs_reference


def _spec(name: str) -> AlignmentLossSpec:
    if name not in ALIGNMENT_LOSSES:
        raise ConfigError(
            f"unknown alignment loss {name!r}", where="loss.name", fix=f"use one of {sorted(ALIGNMENT_LOSSES)}"
        )
    return ALIGNMENT_LOSSES[name]


def alignment_loss(
    name: str,
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_ntok: torch.Tensor,
    rejected_ntok: torch.Tensor,
    chosen_nll_mean: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    **params: float | str,
) -> LossOutput:
    """Compute the alignment loss ``name`` from summed log-probs and token counts of one policy pass.

    DPO uses summed log-probs and the reference ones (IPO is length-normalised with the token counts); SimPO and
    ORPO use per-token means; SFT uses sums and counts. ``chosen_nll_mean`` (ORPO) defaults to the token-level
    mean NLL of the chosen answers. Unknown hyper-parameters for the loss raise :class:`ConfigError`.
    """
    spec = _spec(name)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ConfigError(
            f"loss {name!r} takes no parameter(s) {unknown}", where="loss", fix=f"{name} accepts {list(spec.params)}"
        )
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ConfigError(
            f"loss {name!r} needs reference log-probs",
            where="loss.name",
            fix="precompute reference log-probs or load a reference model",
        )
    chosen_mean = chosen_logps / chosen_ntok.clamp(min=1).to(chosen_logps.dtype)
    rejected_mean = rejected_logps / rejected_ntok.clamp(min=1).to(rejected_logps.dtype)
    if name == "dpo":
        assert ref_chosen_logps is not None and ref_rejected_logps is not None
        kind = params.get("kind", "sigmoid")
        extra = {"chosen_ntokens": chosen_ntok, "rejected_ntokens": rejected_ntok} if kind == "ipo" else {}
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **params, **extra)
    if name == "simpo":
        return simpo_loss(chosen_mean, rejected_mean, **params)
    if name == "orpo":
        if chosen_nll_mean is None:
            chosen_nll_mean = -chosen_logps.sum() / chosen_ntok.sum().clamp(min=1).to(chosen_logps.dtype)
        return orpo_loss(chosen_mean, rejected_mean, chosen_nll_mean, **params)
    return sft_loss(chosen_logps, chosen_ntok)
