"""Preference-optimisation losses as pure functions of per-sequence log-probabilities.

Every function takes 1-D tensors with one entry per preference pair and returns a :class:`LossOutput`: the scalar
loss (mean over pairs) and metrics. Rewards are detached and follow TRL's conventions:

- DPO: ``r = β · (log π(y|x) − log π_ref(y|x))`` (summed log-probs);
- SimPO / ORPO: ``r = β · mean-token log π(y|x)`` (length-normalised, no reference model).

``rewards/accuracy`` is the share of pairs with ``r_chosen > r_rejected``. The formulas are written out in
docs/losses.md. :data:`ALIGNMENT_LOSSES` maps a loss name to its function and declares what it needs (reference
log-probs, length normalisation, an SFT term, token counts); :func:`alignment_loss` builds the function's arguments
from the outputs of one policy forward pass by reading that entry, with no per-loss branches.
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


def mean_logps(sum_logps: torch.Tensor, ntokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-probs ``sum / max(n, 1)`` (the length normalisation of SimPO and ORPO)."""
    return sum_logps / ntokens.clamp(min=1).to(sum_logps.dtype)


NLL_NORMALISATIONS = ("token", "sequence")


def chosen_nll(
    chosen_sum_logps: torch.Tensor, chosen_ntokens: torch.Tensor, normalisation: str = "token"
) -> torch.Tensor:
    """The NLL of the chosen answers that an SFT term adds to a preference loss.

    - ``token``: ``−Σ_b s_b / Σ_b n_b``, one mean over every chosen token of the batch, so longer answers weigh more
      (TRL's ``ORPOTrainer``: ``nn.CrossEntropyLoss()`` over the chosen rows);
    - ``sequence``: ``−mean_b (s_b / n_b)``, each answer's per-token mean NLL, then the mean over pairs (LLaMA-Factory's
      ``CustomDPOTrainer.odds_ratio_loss``: ``sft_loss = −chosen_logps`` on length-averaged log-probs).

    Returns a scalar for ``token``, one value per pair for ``sequence`` (the loss takes their mean).
    """
    if normalisation == "token":
        return -chosen_sum_logps.sum() / chosen_ntokens.sum().clamp(min=1).to(chosen_sum_logps.dtype)
    if normalisation == "sequence":
        return -mean_logps(chosen_sum_logps, chosen_ntokens)
    raise ConfigError(
        f"unknown NLL normalisation {normalisation!r}",
        where="loss.nll_normalisation",
        fix=f"use one of {NLL_NORMALISATIONS}",
    )


@dataclass(frozen=True)
class AlignmentLossSpec:
    """One alignment loss and what it needs from a training step.

    :func:`alignment_loss` builds the arguments of ``fn`` from these fields alone, so adding a loss is its function
    plus one entry in :data:`ALIGNMENT_LOSSES` (and a :class:`~raysafe.train.config.LossSpec` field for each new
    hyper-parameter). ``fn`` is called as ``fn(*policy, *reference, nll, **counts, **params)``:

    - ``policy``: the policy's log-probs of each answer in ``sides``, summed over the answer's tokens, or per-token
      means when ``length_normalised``;
    - ``reference``: the reference model's summed log-probs of the same answers, when ``needs_reference``;
    - ``nll``: the chosen answers' NLL (:func:`chosen_nll`) when ``sft_term``; its normalisation is the loss parameter
      ``nll_normalisation`` (default ``token``), consumed here and not passed on;
    - ``counts``: ``<side>_ntokens=`` token counts when ``token_counts`` (e.g. length-normalised IPO, SFT).
    """

    name: str
    fn: Callable[..., LossOutput]
    #: Names of the keyword hyper-parameters the loss accepts (``beta``, ``gamma``, ...), fields of ``LossSpec``.
    params: tuple[str, ...]
    needs_reference: bool = False
    length_normalised: bool = False
    sft_term: bool = False
    token_counts: bool = False
    sides: tuple[str, ...] = ("chosen", "rejected")


ALIGNMENT_LOSSES: dict[str, AlignmentLossSpec] = {
    "dpo": AlignmentLossSpec(
        "dpo", dpo_loss, ("beta", "label_smoothing", "kind"), needs_reference=True, token_counts=True
    ),
    "simpo": AlignmentLossSpec("simpo", simpo_loss, ("beta", "gamma", "label_smoothing"), length_normalised=True),
    "orpo": AlignmentLossSpec("orpo", orpo_loss, ("beta", "nll_normalisation"), length_normalised=True, sft_term=True),
    "sft": AlignmentLossSpec("sft", sft_loss, (), token_counts=True, sides=("chosen",)),
}


def needs_reference(name: str) -> bool:
    """Whether the alignment loss ``name`` needs reference-model log-probabilities."""
    return loss_entry(name).needs_reference


def loss_entry(name: str) -> AlignmentLossSpec:
    """The registry entry of the alignment loss ``name``; :class:`ConfigError` naming the known ones otherwise."""
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
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    **params: float | str,
) -> LossOutput:
    """Compute the alignment loss ``name`` from summed log-probs and token counts of one policy pass (and the
    reference's summed log-probs), giving its function what its registry entry declares. Unknown hyper-parameters
    for the loss, or a loss that needs reference log-probs without them, raise :class:`ConfigError`.
    """
    spec = loss_entry(name)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ConfigError(
            f"loss {name!r} takes no parameter(s) {unknown}", where="loss", fix=f"{name} accepts {list(spec.params)}"
        )
    sums = {"chosen": chosen_logps, "rejected": rejected_logps}
    ntok = {"chosen": chosen_ntok, "rejected": rejected_ntok}
    refs = {"chosen": ref_chosen_logps, "rejected": ref_rejected_logps}
    args = [mean_logps(sums[s], ntok[s]) if spec.length_normalised else sums[s] for s in spec.sides]
    if spec.needs_reference:
        if any(refs[s] is None for s in spec.sides):
            raise ConfigError(
                f"loss {name!r} needs reference log-probs",
                where="loss.name",
                fix="precompute reference log-probs or load a reference model",
            )
        args += [refs[s] for s in spec.sides]
    if spec.sft_term:
        args.append(chosen_nll(chosen_logps, chosen_ntok, str(params.pop("nll_normalisation", "token"))))
    counts = {f"{s}_ntokens": ntok[s] for s in spec.sides} if spec.token_counts else {}
    return spec.fn(*args, **counts, **params)
