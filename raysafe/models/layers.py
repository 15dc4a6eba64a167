"""Layer access for Hugging Face decoder-only LMs.

Layer numbering follows Hugging Face's ``output_hidden_states``: layer 0 is the embedding output, layer L (1..N) the
output of decoder block L, and layer N is taken after the final norm (as transformers reports it).
"""

from __future__ import annotations

import torch
from torch import nn

from raysafe.errors import ModelError


def text_config(config):
    """The language model's part of a Hugging Face config (``text_config`` of multimodal configs such as Gemma 3's)."""
    return getattr(config, "text_config", None) or config


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (``model.model`` for Llama/Gemma/Qwen/Mistral)."""
    if hasattr(model, "get_decoder"):
        body = model.get_decoder()
        if body is not None:
            return body
    for name in ("model", "transformer"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ModelError(f"cannot find the decoder body of {type(model).__name__}", fix="use a decoder-only causal LM")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    body = decoder_body(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}", fix="use a decoder-only causal LM")


def final_norm(model: nn.Module) -> nn.Module | None:
    body = decoder_body(model)
    for name in ("norm", "ln_f", "final_layernorm"):
        if hasattr(body, name):
            return getattr(body, name)
    return None


def embedding(model: nn.Module) -> nn.Module:
    return model.get_input_embeddings()


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layers(requested: list[int] | str, n_layers: int, model_label: str = "model") -> list[int]:
    """Validate requested layer indices against the model depth (0..n_layers); ``"all"`` → every layer."""
    if requested == "all":
        return list(range(n_layers + 1))
    bad = [x for x in requested if not 0 <= x <= n_layers]
    if bad:
        raise ModelError(
            f"layer index {bad} out of range for {model_label}, which has {n_layers} decoder layers",
            where=f"extract.layers of model {model_label}",
            fix=f"use indices 0..{n_layers} (0 = embeddings, {n_layers} = last layer after the final norm)",
        )
    return sorted(set(requested))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left-padded rows get the positions of an unpadded forward."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding."""
    t = attention_mask.shape[-1]
    ar = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=-1).values
