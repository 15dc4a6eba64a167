"""The one layer convention of raysafe, and layer access for Hugging Face decoder-only LMs.

Layer ``k`` means ``hidden_states[k]`` of Hugging Face's ``output_hidden_states``:

- ``0`` = the input of the first decoder block (the (scaled) token embeddings);
- ``k`` (1 ≤ k < L) = the output of decoder block ``k`` (the raw residual stream);
- ``L`` (= the depth, number of decoder blocks) = the final state AFTER the final norm, which is what Hugging Face
  returns as ``hidden_states[-1]`` and ``last_hidden_state`` (the input of the LM head).

:func:`resolve_layer` turns a config's layer spec (an index, a depth fraction or ``"final"``) into that index, and
:func:`hidden_state_hooks` reads ``hidden_states[k]`` during a forward without materialising the other layers. MLC
capture (training), extraction, the sweep's held-out measure and the separation / concept analyses all go through
these two functions, so the same number names the same representation everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from raysafe.errors import ConfigError, ModelError

#: the layer spec that names the final state after the final norm (= the model's depth)
FINAL = "final"


def text_config(config):
    """The language model's part of a Hugging Face config (``text_config`` of multimodal configs such as Gemma 3's)."""
    return getattr(config, "text_config", None) or config


def config_depth(config) -> int:
    """Number of decoder layers L of a Hugging Face config (valid layer indices are 0..L)."""
    return int(text_config(config).num_hidden_layers)


def resolve_layer(spec: int | float | str, depth: int, where: str = "layer") -> int:
    """The ``hidden_states`` index named by a config's layer ``spec`` for a model of ``depth`` decoder blocks.

    - an int ``k`` in ``0..depth`` is that index (``depth`` = the final state after the final norm);
    - a float ``f`` in ``(0, 1]`` is a depth fraction: ``max(1, round(f·depth))`` (``1.0`` = the final state);
    - ``"final"`` is ``depth``: the final state after the final norm (``hidden_states[-1]``).

    Raises :class:`ConfigError` naming ``where`` for anything else.
    """
    if spec == FINAL:
        return depth
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ConfigError(
            f"layer {spec!r} is neither an index, a depth fraction nor {FINAL!r}",
            where=where,
            fix=f"give an integer 0..{depth}, a fraction in (0, 1] or {FINAL!r}",
        )
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ConfigError(
                f"a fractional layer must lie in (0, 1], got {spec}",
                where=where,
                fix=f"give a depth fraction such as 0.5, an integer layer 0..{depth} or {FINAL!r}",
            )
        return max(1, round(spec * depth))
    if not 0 <= spec <= depth:
        where_it_is = f"beyond the model's depth ({depth} decoder layers)" if spec > 0 else "negative"
        raise ConfigError(
            f"layer {spec} is {where_it_is}",
            where=where,
            fix=f"use 0 (embeddings) to {depth} (the final state after the final norm), a fraction in (0, 1] or "
            f"{FINAL!r}",
        )
    return int(spec)


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


# ------------------------------------------------------------------------------------------- finding the modules
def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside wrappers such as a DeepSpeed engine or DDP (``.module``)."""
    while not hasattr(model, "get_decoder") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (``model.model`` for Llama/Gemma/Qwen/Mistral; the language model of
    multimodal models), also through DeepSpeed/DDP wrappers."""
    model = unwrap_model(model)
    if hasattr(model, "get_decoder"):
        body = model.get_decoder()
        if body is not None:
            return body
    for name in ("model", "transformer", "language_model"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    if _layer_list(model) is not None:
        return model
    raise ModelError(f"cannot find the decoder body of {type(model).__name__}", fix="use a decoder-only causal LM")


def _layer_list(body: nn.Module) -> nn.ModuleList | None:
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks of a causal LM (or of its decoder body)."""
    body = decoder_body(model)
    layers = _layer_list(body)
    if layers is None:
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__}",
            fix="use a decoder-only causal LM whose decoder keeps its blocks in .layers, .h or .blocks",
        )
    return layers


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (``None`` for a model without one)."""
    body = decoder_body(model)
    for name in ("norm", "ln_f", "final_layernorm"):
        if isinstance(getattr(body, name, None), nn.Module):
            return getattr(body, name)
    return None


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks (= the depth L; valid layer indices are 0..L)."""
    return len(decoder_layers(model))


# ----------------------------------------------------------------------------------------------- reading layers
@contextmanager
def hidden_state_hooks(
    model: nn.Module, layers: Iterable[int], on_state: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Within the block, every forward of the decoder calls ``on_state(k, hidden_states[k])`` for each ``k`` in
    ``layers``, in the order the forward computes them (exceptions raised by ``on_state`` propagate: raising one to
    stop the forward early is allowed). The tensor is the model's own (with autograd history when gradients are on).

    ``k = 0`` is read as the input of the first block, ``1 ≤ k < L`` as the output of block ``k``, and ``k = L`` as
    the output of the final norm (block ``L``'s output where the model has no final norm), exactly as Hugging Face
    fills ``hidden_states``. Hooks are removed on exit.
    """
    blocks = decoder_layers(model)
    depth = len(blocks)
    wanted = sorted(set(int(k) for k in layers))
    bad = [k for k in wanted if not 0 <= k <= depth]
    if bad:
        raise ModelError(
            f"layer(s) {bad} out of range for a model with {depth} decoder layers",
            fix=f"use 0 (embeddings) to {depth} (the final state after the final norm)",
        )
    norm = final_norm(model)

    def pre_first_block(k: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            on_state(k, args[0] if args else kwargs["hidden_states"])

        return hook

    def output_of(k: int):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            on_state(k, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    handles = []
    try:
        for k in wanted:
            if k == 0:
                handles.append(blocks[0].register_forward_pre_hook(pre_first_block(k), with_kwargs=True))
            elif k == depth and norm is not None:
                handles.append(norm.register_forward_hook(output_of(k)))
            else:
                handles.append(blocks[k - 1].register_forward_hook(output_of(k)))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------- token indices
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (0 at each row's first real token), so a left- or right-padded row
    gets the positions of its unpadded forward; padding gets 1, as Hugging Face ``generate`` does (a pad position
    never reaches a real token: pads are masked out as keys)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding."""
    t = attention_mask.shape[-1]
    ar = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=-1).values
