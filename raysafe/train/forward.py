"""One policy forward pass over a collated preference batch: answer log-probs and variant hidden states.

The decoder body (``model.get_decoder()``) runs once over all ``N = 2B + B·m`` rows of a
:class:`~raysafe.train.collate.PreferenceCollator` batch. The hidden state of one layer is captured with
:func:`raysafe.models.layers.hidden_state_hooks` (the one layer convention: layer ``k`` = Hugging Face
``hidden_states[k]``; ``0`` = the (scaled) embeddings, ``k`` = output of decoder block ``k``, the depth ``L`` = the
final state after the final norm), the same reader extraction uses, and pooled per variant row. The LM head runs only on the 2B answer rows and only at positions that
predict a scored label, never on variant rows; log-probs are gathered without a float32 copy of the logits.
When ``mlc_layer`` is ``None`` the variant rows are dropped from the pass altogether (steps without MLC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from raysafe.errors import DataError, ModelError
from raysafe.models.layers import decoder_body, hidden_state_hooks, num_layers, position_ids_from_mask, unwrap_model
from raysafe.train.collate import IGNORE_INDEX
from raysafe.train.logprobs import token_logprobs


@dataclass
class ForwardOutput:
    """Per-pair summed log-probs and token counts of the answers, and pooled variant hidden states."""

    chosen_logps: torch.Tensor  # [B] float32, summed over answer tokens
    rejected_logps: torch.Tensor  # [B]
    chosen_ntok: torch.Tensor  # [B] int64
    rejected_ntok: torch.Tensor  # [B]
    chosen_nll_mean: torch.Tensor  # scalar: token-level mean NLL of the chosen answers
    variant_hidden: torch.Tensor | None  # [B, m, H] in the model's dtype, or None without MLC


def apply_lm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states exactly as the model's own forward computes them (incl. Gemma softcapping)."""
    model = unwrap_model(model)
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def pool_hidden(
    hidden: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor, pooling: str = "last"
) -> torch.Tensor:
    """Pool ``hidden [R, T, H]`` per row: at ``last_index [R]`` (``last``) or over attended tokens (``mean``)."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index.to(hidden.device)]
    if pooling == "mean":
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


def _answer_logps(
    model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_positions: int | None, head_chunk: int | None
) -> torch.Tensor:
    """Per-position label log-probs from selected final hidden states ``[K, H]`` and labels ``[K]``."""
    if not head_chunk or hidden.shape[0] <= head_chunk:
        return token_logprobs(apply_lm_head(model, hidden), targets, chunk_positions)

    def chunk_fn(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return token_logprobs(apply_lm_head(model, h), t, chunk_positions)

    parts = [
        checkpoint(chunk_fn, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(head_chunk), targets.split(head_chunk))
    ]
    return torch.cat(parts)


def policy_forward(
    model: nn.Module,
    batch: dict[str, Any],
    mlc_layer: int | None,
    pooling: Literal["last", "mean"] = "last",
    chunk_positions: int | None = None,
    head_chunk: int | None = None,
) -> ForwardOutput:
    """Answer log-probs of the 2B response rows and pooled ``hidden_states[mlc_layer]`` of the variant rows.

    ``batch`` is a :class:`~raysafe.train.collate.PreferenceCollator` output (tensors on the model's device).
    ``position_ids`` are taken from the batch (or computed from the attention mask) so left padding is exact.
    ``head_chunk`` (positions) applies the LM head chunk by chunk under activation checkpointing, so at most one
    chunk of logits exists at a time (forward and backward); ``None`` computes the selected logits at once.
    """
    n_pairs, m = int(batch["n_pairs"]), int(batch["m"])
    input_ids, attention_mask, labels, position_ids = _forward_rows(batch, mlc_layer)
    decoder = decoder_body(model)
    captured: dict[int, torch.Tensor] = {}
    depth = num_layers(model)
    if mlc_layer is not None and not 0 <= mlc_layer <= depth:
        raise ModelError(
            f"MLC layer {mlc_layer} is out of range for a model with {depth} layers",
            where="mlc.layer",
            fix=f"use 0 (embeddings) to {depth} (the final state after the final norm)",
        )
    with hidden_state_hooks(model, [mlc_layer] if mlc_layer is not None else [], captured.__setitem__):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    last_hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    answers = _answer_logps_per_row(model, last_hidden, labels, n_pairs, chunk_positions, head_chunk)

    variant_hidden = None
    if mlc_layer is not None:
        resp = 2 * n_pairs
        assert mlc_layer in captured, "the layer hook did not fire"
        pooled = pool_hidden(captured[mlc_layer][resp:], attention_mask[resp:], batch["variant_last_index"], pooling)
        variant_hidden = pooled.reshape(n_pairs, m, -1)
    return ForwardOutput(*answers, variant_hidden)


def _forward_rows(batch: dict[str, Any], mlc_layer: int | None) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels, position_ids) the pass runs on: every row, or without the MLC term only
    the answer rows trimmed to their attended columns. Refuses a batch whose row count is not 2·B + B·m."""
    n_pairs, m = int(batch["n_pairs"]), int(batch["m"])
    input_ids = batch["input_ids"]
    attention_mask = batch["attention_mask"]
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    n_rows = 2 * n_pairs + n_pairs * m
    if input_ids.shape[0] != n_rows:
        raise DataError(
            f"batch has {input_ids.shape[0]} rows, expected 2·B + B·m = {n_rows} (B={n_pairs}, m={m})",
            where="policy_forward batch",
            fix="build batches with raysafe.train.collate.PreferenceCollator",
        )
    if mlc_layer is None:  # only the answer rows, trimmed to their attended columns
        rows = slice(0, 2 * n_pairs)
        cols = attention_mask[rows].any(0).nonzero().flatten()
        span = slice(int(cols[0]), int(cols[-1]) + 1)
        input_ids, attention_mask = input_ids[rows, span], attention_mask[rows, span]
        labels, position_ids = labels[rows, span], position_ids[rows, span]
    return input_ids, attention_mask, labels, position_ids


def _answer_logps_per_row(model, last_hidden, labels, n_pairs: int, chunk_positions, head_chunk) -> tuple:
    """(chosen log-prob sums, rejected log-prob sums, chosen token counts, rejected token counts, chosen mean NLL)
    over the answer tokens of the 2B response rows."""
    resp = 2 * n_pairs
    targets = labels[:resp, 1:]
    scored = targets != IGNORE_INDEX
    row_of = scored.nonzero()[:, 0]
    selected = last_hidden[:resp, :-1][scored]
    logps = _answer_logps(model, selected, targets[scored], chunk_positions, head_chunk)
    sums = torch.zeros(resp, dtype=logps.dtype, device=logps.device).index_add(0, row_of, logps)
    ntok = scored.sum(-1)
    chosen_logps, rejected_logps = sums[:n_pairs], sums[n_pairs:]
    chosen_ntok, rejected_ntok = ntok[:n_pairs], ntok[n_pairs:]
    chosen_nll_mean = -chosen_logps.sum() / chosen_ntok.sum().clamp(min=1).to(chosen_logps.dtype)
    return chosen_logps, rejected_logps, chosen_ntok, rejected_ntok, chosen_nll_mean


def reference_logps(model: nn.Module, batch: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs ``(chosen [B], rejected [B])`` of a frozen reference model, without gradients."""
    with torch.no_grad():
        out = policy_forward(model, batch, mlc_layer=None, **kwargs)
    return out.chosen_logps, out.rejected_logps
