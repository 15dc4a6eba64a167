"""Per-token and per-sequence log-probabilities of labels under a causal LM, without a float32 copy of the logits.

The naive ``log_softmax(logits.float(), -1).gather(-1, labels)`` materialises two float32 tensors of the size of
the logits (``rows × tokens × vocab``; with Gemma 3's 262,144-token vocabulary that is 1 GiB per 1,024 tokens).
Here the label logit is gathered directly and the log-normaliser ``logsumexp`` is computed chunk by chunk in float32,
so the extra memory is one chunk. The backward pass recomputes ``softmax`` chunk by chunk from the saved logits
(a custom autograd function), so no float32 chunk is kept alive for backward either.
"""

from __future__ import annotations

import torch

#: Float32 elements of one working chunk (``positions × vocab``): 2**24 elements = 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def default_chunk_positions(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Number of token positions processed together so that one float32 chunk holds ``chunk_elements`` values."""
    return max(1, chunk_elements // max(1, vocab_size))


def _chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log_softmax(x, -1).gather(-1, t)`` for ``x`` of shape [N, L, V] (any strides), computed in float32 chunks.

    Saves only the input logits (a reference, no copy) for backward, which recomputes ``softmax`` chunk by chunk
    (fused, float32 output) and subtracts it from the one-hot target: ``∂/∂x = g · (onehot(t) − softmax(x))``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        n_rows, length, _ = logits.shape
        lse = torch.empty((n_rows, length), dtype=torch.float32, device=logits.device)
        for n in range(n_rows):
            for s, e in _chunk_bounds(length, chunk):
                lse[n, s:e] = torch.logsumexp(logits[n, s:e].float(), dim=-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, targets)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_out = grad_out.float()
        for n in range(logits.shape[0]):
            for s, e in _chunk_bounds(logits.shape[1], chunk):
                g = torch.softmax(logits[n, s:e], dim=-1, dtype=torch.float32).mul_(-grad_out[n, s:e, None])
                g.scatter_add_(-1, targets[n, s:e, None], grad_out[n, s:e, None])
                grad[n, s:e] = g.to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_positions: int | None = None) -> torch.Tensor:
    """Float32 ``log p(target | ·)`` for every position: ``logits[..., V]`` and integer ``targets[...]`` → ``[...]``.

    Equal to ``log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]``; peak extra memory is one
    float32 chunk of ``chunk_positions × V`` values (default: :func:`default_chunk_positions`). Accepts 2-D
    ``[K, V]`` or 3-D ``[N, L, V]`` logits, including non-contiguous views (e.g. ``logits[:, :-1]``).
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [K, V] or [N, L, V], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape[:-1])}")
    chunk = chunk_positions or default_chunk_positions(logits.shape[-1])
    squeeze = logits.dim() == 2
    x = logits.unsqueeze(0) if squeeze else logits
    t = (targets.unsqueeze(0) if squeeze else targets).long()
    out = _SelectiveLogSoftmax.apply(x, t, chunk)
    return out.squeeze(0) if squeeze else out


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_positions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probabilities per row of a causal LM and the number of scored tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (the causal shift); positions whose label is ``ignore_index``
    contribute nothing. Returns ``(sum_logps [N] float32, n_tokens [N] int64)``; the per-token mean of a row is
    ``sum_logps / n_tokens`` (see :func:`mean_logprobs`).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [N, T, V] and labels [N, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    targets = shifted.masked_fill(~mask, 0)
    per_token = token_logprobs(logits[:, :-1], targets, chunk_positions)
    sum_logps = (per_token * mask).sum(-1)
    return sum_logps, mask.sum(-1)


def mean_logprobs(sum_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-probability ``sum_logps / max(n_tokens, 1)`` (a row with no scored token gives 0)."""
    return sum_logps / n_tokens.clamp(min=1).to(sum_logps.dtype)
