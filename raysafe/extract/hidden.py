"""Pooled hidden states of chosen layers from one batched forward of the decoder body.

Layers follow the one convention of :mod:`raysafe.models.layers` (layer k = Hugging Face ``hidden_states[k]``; the
last index is the final state after the final norm) and are read with its :func:`hidden_state_hooks`, the same
reader the MLC loss uses in training. The LM head is never run and the forward stops after the deepest requested layer (a forward hook raises once that
layer's output is pooled), so asking for early layers costs only those layers. When only the ``last`` position is
pooled, the deepest block's MLP runs on the last token of each row alone: no other position of that block's output is
ever read. Pooling happens on the device of the layer read (a model split over an actor's GPUs puts later layers on
later GPUs); only the pooled [batch, hidden] vectors are returned, in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from raysafe.models.layers import (
    decoder_body,
    decoder_layers,
    hidden_state_hooks,
    last_token_index,
    position_ids_from_mask,
)

POSITIONS = ("last", "mean")


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer to skip the rest of the network."""


class _LastRowsOnly(nn.Module):
    """Stands in for the deepest block's MLP: runs it on each row's pooled token only, zeros elsewhere.

    The zeros never reach a result: the forward stops at this block and only ``last`` positions are pooled.
    """

    def __init__(self, mlp: nn.Module, last_index: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        self.last_index = last_index

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if x.dim() != 3:
            return self.mlp(x, *args, **kwargs)
        rows = torch.arange(x.shape[0], device=x.device)
        last = self.last_index.to(x.device)  # the block may sit on another GPU than the inputs (a split model)
        y = self.mlp(x[rows, last].unsqueeze(1), *args, **kwargs)
        if not isinstance(y, torch.Tensor):  # e.g. an MoE block that also returns router logits
            return self.mlp(x, *args, **kwargs)
        out = x.new_zeros(x.shape[:2] + y.shape[2:])
        out[rows, last] = y[:, 0]
        return out


def _pool(h: torch.Tensor, mask: torch.Tensor, last_idx: torch.Tensor, position: str) -> torch.Tensor:
    # A model split over several GPUs computes later layers on later devices than the inputs sit on.
    mask, last_idx = mask.to(h.device), last_idx.to(h.device)
    if position == "last":
        return h[torch.arange(h.shape[0], device=h.device), last_idx].float()
    m = mask.to(h.dtype).unsqueeze(-1)
    # Sum in float32 so that bf16 activations do not lose precision across long sequences.
    return (h.float() * m.float()).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).float()


@torch.inference_mode()
def pooled_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: list[int],
    positions: tuple[str, ...] | list[str] = ("last",),
    last_index: torch.Tensor | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, position): [batch, hidden] float32} for the requested layers (HF hidden_states numbering).

    ``last_index`` overrides the row's last real token as the ``last`` position (e.g. the end of the prompt).
    """
    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    deepest = wanted[-1]
    if last_index is None:
        last_index = last_token_index(attention_mask)
    out: dict[tuple[int, str], torch.Tensor] = {}

    def capture(layer: int, h: torch.Tensor) -> None:
        for p in positions:
            out[(layer, p)] = _pool(h, attention_mask, last_index, p)
        if layer == deepest:
            raise _StopForward

    block = blocks[deepest - 1] if deepest >= 1 else None
    trimmed = block if set(positions) == {"last"} and isinstance(getattr(block, "mlp", None), nn.Module) else None
    if trimmed is not None:
        trimmed.mlp = _LastRowsOnly(trimmed.mlp, last_index)
    try:
        with hidden_state_hooks(model, wanted, capture):
            try:
                decoder_body(model)(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    use_cache=False,
                )
            except _StopForward:
                pass
    finally:
        if trimmed is not None:
            trimmed.mlp = trimmed.mlp.mlp
    return out
