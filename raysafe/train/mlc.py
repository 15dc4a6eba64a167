"""The Multi-Lingual Consistency (MLC) loss of Bu et al. (ICLR 2026), its projection head, schedule and diagnostics.

For each preference item the hidden states of its ``m`` prompt variants (one per language) at one layer are
projected by :class:`MLCHead` (hidden → d, with bias) into ``z [B, m, d]``. :func:`mlc_loss` L2-normalises the
rows of each ``Z_b`` (m × d), takes its singular values ``σ₁ ≥ … ≥ σ_k`` (k = min(m, d)) in float32 and minimises a
cross-entropy that puts ``σ₁`` first: the loss is smallest when the m rows are collinear (rank 1, all languages
mapped to one direction) and largest when they are orthonormal. See docs/losses.md for the formulas.

Singular values come from :func:`singular_values`, whose backward is ``U diag(g) Vᵀ`` restricted to the singular
values above a rank tolerance: finite for repeated or zero singular values and for m > d, and at rank-deficient
inputs (identical rows) it is the minimum-norm subgradient, which agrees with finite differences.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysafe.consistency import mean_offdiag_cosine, normalise_rows
from raysafe.errors import ConfigError, ModelError
from raysafe.train.config import MLCConfig
from raysafe.train.losses import LossOutput

HEAD_WEIGHTS = "mlc_head.safetensors"
HEAD_CONFIG = "mlc_head.json"
MLC_FORMS = ("released", "plain")


# ----------------------------------------------------------------------------------------------- singular values
class _SingularValues(torch.autograd.Function):
    """Singular values of a batch of matrices [..., m, d] with a backward that is safe at rank deficiency."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        u, s, vh = torch.linalg.svd(z, full_matrices=False)
        ctx.save_for_backward(u, s, vh)
        return s

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor):  # type: ignore[override]
        u, s, vh = ctx.saved_tensors
        m, d = u.shape[-2], vh.shape[-1]
        tol = s[..., :1] * (max(m, d) * torch.finfo(s.dtype).eps)
        g = torch.where(s > tol, grad_s, torch.zeros_like(grad_s))
        return (u * g.unsqueeze(-2)) @ vh


def singular_values(z: torch.Tensor) -> torch.Tensor:
    """Descending singular values ``[..., min(m, d)]`` of ``z [..., m, d]``, in float32 (float64 stays float64).

    Same values as ``torch.linalg.svdvals``. Gradient: ``Σ_i g_i u_i v_iᵀ`` over singular values above the rank
    tolerance ``σ₁ · max(m, d) · eps``; zero singular values contribute no gradient (their exact derivative does
    not exist; zero is the minimum-norm subgradient of a loss increasing in them).
    """
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return _SingularValues.apply(z)


# ----------------------------------------------------------------------------------------------------- the losses
def mlc_loss(z: torch.Tensor, tau: float = 0.2, eps: float = 0.0, form: str = "released") -> LossOutput:
    """MLC loss of projected variant representations ``z [B, m, d]`` (m ≥ 2), averaged over the batch.

    With rows L2-normalised and ``σ`` the singular values of each ``Z_b``:

    - ``released``: ``−log( exp(σ₁/(τ·sg(σ₁))) / Σ_j exp(σ_j/(τ·sg(σ₁) + ε)) )`` (sg = stop-gradient). With
      ``ε = 0`` (the default) this is the authors' released code, ``cross_entropy((σ / sg(σ₁)) / τ, 0)``
      (github.com/Yuyan-B/MLC, src/llamafactory/train/dpo/trainer.py, ``_compute_aux_loss``); ``ε > 0`` enlarges
      the denominator's scale only (an earlier raysafe variant, kept as an option);
    - ``plain``: ``−log softmax(σ/τ)₁`` (the paper's equation).

    Metrics: ``mlc/loss``, ``mlc/sigma1`` (mean σ₁), ``mlc/rank1_energy`` (mean σ₁²/Σσ²).
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"z must be [B, m, d] with m >= 2, got {tuple(z.shape)}")
    if form not in MLC_FORMS:
        raise ConfigError(f"unknown MLC form {form!r}", where="mlc.form", fix=f"use one of {MLC_FORMS}")
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}", where="mlc.tau")
    sigma = singular_values(normalise_rows(z))
    s1 = sigma[:, 0]
    if form == "released":
        scale = tau * s1.detach()
        log_num = s1 / scale
        log_den = torch.logsumexp(sigma / (scale + eps).unsqueeze(-1), dim=-1)
        per_item = log_den - log_num
    else:
        per_item = -torch.log_softmax(sigma / tau, dim=-1)[:, 0]
    loss = per_item.mean()
    energy = sigma.detach() ** 2
    metrics: dict[str, float | torch.Tensor] = {
        "mlc/loss": loss.detach(),
        "mlc/sigma1": s1.detach().mean(),
        "mlc/rank1_energy": (energy[:, 0] / energy.sum(-1).clamp(min=1e-30)).mean(),
    }
    return LossOutput(loss, metrics)


def pairwise_cosine_loss(z: torch.Tensor) -> LossOutput:
    """Ablation baseline to MLC: ``1 − mean over items and distinct row pairs of cos(z_i, z_j)`` for ``z [B, m, d]``."""
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"z must be [B, m, d] with m >= 2, got {tuple(z.shape)}")
    loss = 1.0 - mean_offdiag_cosine(z).mean()
    return LossOutput(loss, {"cosine/loss": loss.detach()})


def consistency_loss(z: torch.Tensor, config: MLCConfig) -> LossOutput:
    """The consistency term chosen by ``config.kind``: :func:`mlc_loss` or :func:`pairwise_cosine_loss`."""
    if config.kind == "mlc":
        return mlc_loss(z, tau=config.tau, eps=config.eps, form=config.form)
    return pairwise_cosine_loss(z)


# ------------------------------------------------------------------------------------------------- head and config
class MLCHead(nn.Module):
    """The extractor of the MLC loss, stored beside the model: ``Linear(hidden → d)``, with a bias (``kind="linear"``,
    the released code's), without one (``"linear_nobias"``) or a fixed random orthogonal projection without bias
    (``"frozen_random"``: no parameter to train, so only the backbone can make the languages agree)."""

    KINDS = ("linear", "linear_nobias", "frozen_random")

    def __init__(self, hidden: int, d: int = 512, kind: str = "linear", seed: int = 0):
        super().__init__()
        if hidden < 1 or d < 1:
            raise ConfigError(f"MLC head sizes must be positive, got hidden={hidden}, d={d}", where="mlc.d")
        if kind not in self.KINDS:
            raise ConfigError(f"unknown MLC head {kind!r}", where="mlc.head", fix=f"use one of {list(self.KINDS)}")
        self.hidden = hidden
        self.d = d
        self.kind = kind
        self.proj = nn.Linear(hidden, d, bias=kind == "linear")
        if kind == "frozen_random":
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(max(hidden, d), min(hidden, d), generator=g))
            with torch.no_grad():  # orthonormal rows (d ≤ hidden) or columns: lengths and angles kept
                self.proj.weight.copy_(q.T if d <= hidden else q)
            self.proj.weight.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``[..., hidden]`` to ``[..., d]`` (input cast to the head's dtype)."""
        return self.proj(h.to(self.proj.weight.dtype))

    def save(self, directory: str | Path) -> Path:
        """Write ``mlc_head.safetensors`` and ``mlc_head.json`` ({hidden, d, kind}) into ``directory``; return the weights path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / HEAD_WEIGHTS))
        (directory / HEAD_CONFIG).write_text(json.dumps({"hidden": self.hidden, "d": self.d, "kind": self.kind}))
        return directory / HEAD_WEIGHTS

    @staticmethod
    def exists(directory: str | Path) -> bool:
        """Whether ``directory`` holds a saved MLC head."""
        directory = Path(directory)
        return (directory / HEAD_WEIGHTS).is_file() and (directory / HEAD_CONFIG).is_file()

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MLCHead:
        """Rebuild a head saved with :meth:`save` (raises :class:`ModelError` when files are missing or disagree)."""
        directory = Path(directory)
        if not cls.exists(directory):
            raise ModelError(
                "no MLC head found",
                where=str(directory),
                fix=f"expected {HEAD_WEIGHTS} and {HEAD_CONFIG}; train with the MLC loss enabled or disable it",
            )
        meta = json.loads((directory / HEAD_CONFIG).read_text())
        head = cls(int(meta["hidden"]), int(meta["d"]), meta.get("kind", "linear"))
        state = load_file(str(directory / HEAD_WEIGHTS), device=str(map_location))
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            raise ModelError(
                f"MLC head weights {found} do not match its config {expected}", where=str(directory / HEAD_WEIGHTS)
            )
        head.load_state_dict(state)
        return head.to(map_location)


@dataclass(frozen=True)
class MLCSchedule:
    """Apply the MLC term every ``every_k``-th optimiser step (steps counted from 0, so step 0 is active)."""

    every_k: int = 2

    def __post_init__(self) -> None:
        if self.every_k < 1:
            raise ConfigError(f"every_k must be >= 1, got {self.every_k}", where="mlc.every_k")

    def active(self, step: int) -> bool:
        """Whether the MLC term is added at optimiser step ``step``."""
        return step % self.every_k == 0


# ------------------------------------------------------------------------------------------------- head monitor
#: a head is flagged as absorbing the loss when its bias makes up more than this share of ‖z‖ (every language then
#: maps to nearly the same z whatever h is), or when one direction holds more than this share of its weight's energy
#: (W projects every state onto one line, so any rows become collinear): the head, not the model, carries the loss
ABSORB_LIMIT = 0.9


def mlc_loss_floor(m: int, tau: float = 0.2, eps: float = 0.0, form: str = "released") -> float:
    """The least value of :func:`mlc_loss` for m variants: all rows collinear, σ = (√m, 0, …, 0)."""
    s1 = math.sqrt(m)
    if form == "released":
        return math.log(math.exp(s1 / (tau * s1 + eps)) + (m - 1)) - 1.0 / tau
    return math.log(math.exp(s1 / tau) + (m - 1)) - s1 / tau


@torch.no_grad()
def head_monitor(head: MLCHead, hidden: torch.Tensor, grad_hidden: torch.Tensor | None = None) -> dict[str, float]:
    """Whether the MLC head, rather than the model, is what makes the languages agree, for one batch of variant
    hidden states ``hidden [B, m, H]`` (and ``grad_hidden``, the MLC loss's gradient with respect to them):

    - ``head/bias_share``: mean over rows of ``‖b‖ / (‖b‖ + ‖W h‖)`` (0 without a bias; near 1 when the bias is the
      vector: every language then maps to nearly the same z whatever h is);
    - ``head/rank1_z`` / ``head/rank1_h``: rank-1 energy of the item's rows of z and of h (row-normalised);
      ``head/rank1_h_centred``: the same for h minus its batch mean (the shared direction of LM states removed);
    - ``head/w_rank1``: ``σ₁² / Σσ²`` of the weight W (1/d for an orthogonal projection, 1 when W maps every state
      onto one line);
    - ``head/grad_norm_hidden``: mean norm per row of the MLC gradient that reaches the model (when given);
    - ``head/absorbing``: 1 when ``bias_share`` or ``w_rank1`` exceeds :data:`ABSORB_LIMIT`, else 0.
    """
    h = hidden.float()
    w = head.proj.weight.float()
    wh = h @ w.T
    b = head.proj.bias
    if b is not None:
        nb = b.float().norm()
        share = (nb / (nb + wh.norm(dim=-1)).clamp(min=1e-30)).mean()
        z = wh + b.float()
    else:
        share = torch.zeros(())
        z = wh
    sw = torch.linalg.svdvals(w) ** 2
    w_rank1 = float(sw[0] / sw.sum().clamp(min=1e-30))
    out = {
        "head/bias_share": float(share),
        "head/w_rank1": w_rank1,
        "head/rank1_z": _rank1(z),
        "head/rank1_h": _rank1(h),
        "head/rank1_h_centred": _rank1(h - h.reshape(-1, h.shape[-1]).mean(0)),
        "head/absorbing": float(float(share) > ABSORB_LIMIT or w_rank1 > ABSORB_LIMIT),
    }
    if grad_hidden is not None:
        out["head/grad_norm_hidden"] = float(grad_hidden.float().norm(dim=-1).mean())
    return out


def _rank1(x: torch.Tensor) -> float:
    e = torch.linalg.svdvals(normalise_rows(x)) ** 2
    return float((e[:, 0] / e.sum(-1).clamp(min=1e-30)).mean())
