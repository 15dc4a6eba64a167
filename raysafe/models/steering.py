"""Cross-lingual control: add ``alpha * v`` to the residual stream after chosen decoder layers, and measure it.

Layers follow the one convention of :mod:`raysafe.models.layers`: layer ``L`` (1-based) is the output of decoder
block ``L``, i.e. ``hidden_states[L]``. Steering at layer ``L`` adds to the output of block ``L`` (the residual
stream); at the last layer ``L = depth`` that is the input of the final norm, so the steered ``hidden_states[depth]``
(read by the probe, like every layer, through :func:`~raysafe.models.layers.hidden_state_hooks`) is the normalised
``norm(h + alpha * v)``.

:func:`steering` is a context manager: inside it, the output of each chosen layer becomes ``h + alpha * v_L`` at
non-pad positions (``attention_mask == 1`` of the current forward call; during ``generate`` with a KV cache the
newly fed tokens are non-pad), and stays bit-identical at pad positions. On exit the hooks are removed and the
model computes exactly what it computed before.

:func:`measure_steering` sweeps ``alpha`` for one set of layers and reports, per target language: the shift of the
concept projection of held-out pairs, the behaviour score (mean per-token log-probability of the positive sentence
minus that of the negative sentence) and the perplexity of neutral text.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import polars as pl
import torch
from torch import nn

from raysafe.errors import ConfigError, ModelError
from raysafe.models.layers import (
    decoder_body,
    decoder_layers,
    hidden_state_hooks,
    last_token_index,
    position_ids_from_mask,
)


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the input-embedding dimension)."""
    return int(model.get_input_embeddings().weight.shape[1])


def _as_vector(v: object, size: int, layer: int) -> torch.Tensor:
    """``v`` as a float32 CPU tensor of shape (size,); ModelError otherwise or when not finite."""
    if isinstance(v, torch.Tensor):
        t = v.detach().float().cpu()
    else:
        t = torch.from_numpy(np.asarray(v, dtype=np.float32).copy())
    if t.dim() != 1 or t.shape[0] != size:
        raise ModelError(
            f"steering vector for layer {layer} has shape {tuple(t.shape)}, expected ({size},)",
            where=f"layer {layer}",
            fix="use a concept vector of this model's hidden size",
        )
    if not torch.isfinite(t).all():
        raise ModelError(f"steering vector for layer {layer} has non-finite values", where=f"layer {layer}")
    return t


def _check_layers(vectors: Mapping[int, object], n_layers: int) -> None:
    if not vectors:
        raise ConfigError("no steering layers given", fix="pass {layer: vector} for at least one layer")
    bad = [L for L in vectors if not isinstance(L, (int, np.integer)) or not 1 <= int(L) <= n_layers]
    if bad:
        raise ModelError(
            f"steering layer(s) {bad} out of range",
            where=f"model with {n_layers} decoder layers",
            fix=f"layers are 1-based outputs of decoder layers: 1..{n_layers}",
        )


@contextmanager
def steering(model: nn.Module, vectors: Mapping[int, object], alpha: float) -> Iterator[None]:
    """Within the block, add ``alpha * vectors[L]`` to the output of decoder layer ``L`` (1-based, =
    ``hidden_states[L]``) for each ``L`` in ``vectors``, at non-pad positions only; hooks are removed on exit."""
    if not math.isfinite(float(alpha)):
        raise ConfigError(f"alpha must be finite, got {alpha!r}")
    owner, layers = decoder_body(model), decoder_layers(model)
    _check_layers(vectors, len(layers))
    size = hidden_size(model)
    vecs = {int(L): _as_vector(v, size, int(L)) for L, v in vectors.items()}
    state: dict[str, torch.Tensor | None] = {"mask": None}
    signature = inspect.signature(owner.forward)

    def capture_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        mask = bound.get("attention_mask", kwargs.get("attention_mask"))
        if isinstance(mask, dict):  # some models pass one mask per attention type
            mask = None
        if mask is not None and mask.dim() != 2:
            raise ModelError(
                f"steering needs a 2-D [batch, seq] attention mask, got shape {tuple(mask.shape)}",
                fix="call the model with the tokenizer's 2-D attention_mask",
            )
        state["mask"] = mask

    def clear_mask(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        state["mask"] = None

    def make_hook(vec: torch.Tensor):
        def add(module: nn.Module, args: tuple, output: object) -> object:
            hidden = output[0] if isinstance(output, tuple) else output
            delta = (float(alpha) * vec).to(device=hidden.device, dtype=hidden.dtype)
            mask = state["mask"]
            if mask is None:
                steered = hidden + delta
            else:
                batch, seq = hidden.shape[0], hidden.shape[1]
                if mask.shape[0] != batch or mask.shape[1] < seq:
                    raise ModelError(
                        f"attention mask of shape {tuple(mask.shape)} does not cover hidden states "
                        f"of shape {tuple(hidden.shape)}"
                    )
                keep = mask[:, -seq:].to(hidden.device).bool().unsqueeze(-1)
                steered = torch.where(keep, hidden + delta, hidden)
            if isinstance(output, tuple):
                return (steered, *output[1:])
            return steered

        return add

    handles = [
        owner.register_forward_pre_hook(capture_mask, with_kwargs=True, prepend=True),
        owner.register_forward_hook(clear_mask, with_kwargs=True),
    ]
    try:
        for L, vec in sorted(vecs.items()):
            handles.append(layers[L - 1].register_forward_hook(make_hook(vec), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class TextStats:
    """Per text: summed log-probability of its tokens after the first, their number, and (if asked) the output of
    one decoder layer at the last non-pad token."""

    logprob_sum: np.ndarray
    n_tokens: np.ndarray
    last_state: np.ndarray | None


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with a BOS first when the tokenizer has one (added if its template does not), padded on the
    tokenizer's padding side; returns (input_ids, attention_mask)."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError("tokenizer has neither a pad nor an eos token", fix="set tokenizer.pad_token")
    seqs = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        seqs.append(ids[:max_length])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if tokenizer.padding_side == "left":
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


@torch.inference_mode()
def text_stats(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    probe_layer: int | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    logprobs: bool = True,
) -> TextStats:
    """Log-likelihood of each text under the model (any active steering applies) and, with ``probe_layer``,
    ``hidden_states[probe_layer]`` (1-based: the output of that decoder block; the last layer after the final norm)
    at each text's last non-pad token. With ``logprobs=False`` only the decoder body runs (no LM head, which
    dominates small models with large vocabularies) and the log-probability sums are NaN."""
    device = next(model.parameters()).device
    body, layers = decoder_body(model), decoder_layers(model)
    if probe_layer is not None and not 1 <= probe_layer <= len(layers):
        raise ModelError(f"probe layer {probe_layer} out of range 1..{len(layers)}")
    if not logprobs and probe_layer is None:
        raise ConfigError("text_stats with logprobs=False needs a probe_layer: there is nothing else to compute")
    sums, counts, states = [], [], []
    captured: dict[str, torch.Tensor] = {}

    def capture(_layer: int, h: torch.Tensor) -> None:
        captured["h"] = h.detach()

    with hidden_state_hooks(model, [probe_layer] if probe_layer is not None else [], capture):
        for start in range(0, len(texts), batch_size):
            ids, mask = _encode(tokenizer, texts[start : start + batch_size], max_length)
            ids, mask = ids.to(device), mask.to(device)
            positions = position_ids_from_mask(mask)  # as generate() does, so padding side does not matter
            if not logprobs:
                body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                sums.extend([float("nan")] * ids.shape[0])
                counts.extend(int(n) - 1 for n in mask.sum(dim=1))
            else:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            for i in range(ids.shape[0] if logprobs else 0):
                lg = logits[i, :-1].float()
                target = ids[i, 1:]
                valid = (mask[i, 1:] == 1) & (mask[i, :-1] == 1)
                lp = lg.gather(-1, target[:, None])[:, 0] - torch.logsumexp(lg, dim=-1)
                sums.append(float(lp[valid].sum()))
                counts.append(int(valid.sum()))
            if probe_layer is not None:
                last = last_token_index(mask)
                states.append(captured["h"][torch.arange(ids.shape[0], device=device), last].float().cpu().numpy())
    return TextStats(np.array(sums), np.array(counts), np.concatenate(states) if states else None)


def behaviour_score(pos: TextStats, neg: TextStats) -> float:
    """Mean over pairs of (mean token log-prob of the positive sentence - that of the negative sentence)."""
    return float(np.mean(pos.logprob_sum / np.maximum(pos.n_tokens, 1) - neg.logprob_sum / np.maximum(neg.n_tokens, 1)))


def perplexity(stats: TextStats) -> float:
    """exp(- total log-prob / total scored tokens) over a set of texts."""
    n = int(stats.n_tokens.sum())
    return float(math.exp(-stats.logprob_sum.sum() / n)) if n else float("nan")


Probe = tuple[int, object]


def _unit_probe(p_vec) -> np.ndarray:
    """The probe direction as a float64 unit vector (a zero vector stays zero)."""
    u = np.asarray(p_vec.detach().cpu() if isinstance(p_vec, torch.Tensor) else p_vec, dtype=np.float64)
    return u / (np.linalg.norm(u) or 1.0)


def _steered_measures(
    model, tokenizer, vectors, pairs, neutral_texts, p_layer: int, u, batch_size: int, max_length: int, alpha: float
) -> dict:
    """Projection, pair gap, behaviour score and neutral perplexity of one language under ``alpha`` (0: unsteered)."""
    texts = [p for p, _ in pairs] + [n for _, n in pairs]
    ctx = steering(model, vectors, alpha) if alpha != 0 else nullcontext()
    with ctx:
        st = text_stats(model, tokenizer, texts, probe_layer=p_layer, batch_size=batch_size, max_length=max_length)
        nt = (
            text_stats(model, tokenizer, neutral_texts, batch_size=batch_size, max_length=max_length)
            if neutral_texts
            else None
        )
    k = len(pairs)
    pos = TextStats(st.logprob_sum[:k], st.n_tokens[:k], None)
    neg = TextStats(st.logprob_sum[k:], st.n_tokens[k:], None)
    proj = st.last_state.astype(np.float64) @ u
    return {
        "projection": float(proj.mean()),
        "pair_gap": float(proj[:k].mean() - proj[k:].mean()),
        "behaviour_score": behaviour_score(pos, neg),
        "perplexity": perplexity(nt) if nt is not None else float("nan"),
    }


def _steering_row(lang: str, label: str, alpha: float, p_layer, n_pairs: int, n_neutral: int, m: dict, base: dict):
    """One row of measure_steering's table: the measures under ``alpha`` and their changes from alpha 0."""
    return {
        "lang": lang,
        "layers": label,
        "alpha": float(alpha),
        "probe_layer": int(p_layer),
        "n_pairs": n_pairs,
        "n_neutral": n_neutral,
        "projection": m["projection"],
        "projection_shift": m["projection"] - base["projection"],
        "pair_gap": m["pair_gap"],
        "projection_shift_in_gaps": (
            (m["projection"] - base["projection"]) / base["pair_gap"] if base["pair_gap"] != 0 else float("nan")
        ),
        "behaviour_score": m["behaviour_score"],
        "behaviour_shift": m["behaviour_score"] - base["behaviour_score"],
        "perplexity": m["perplexity"],
        "perplexity_ratio": m["perplexity"] / base["perplexity"],
    }


def measure_steering(
    model: nn.Module,
    tokenizer,
    vectors: Mapping[int, object],
    alphas: Sequence[float],
    held_out: Mapping[str, Sequence[tuple[str, str]]],
    neutral: Mapping[str, Sequence[str]],
    *,
    probe: Probe | Mapping[str, Probe] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> pl.DataFrame:
    """Steer with ``alpha * vectors[L]`` at layers ``vectors`` for each alpha and measure, per target language:

    * ``projection``: mean over held-out sentences (both sides) of ``h . u`` where ``h`` is the output of the probe
      layer at the last token and ``u`` the unit probe direction; ``projection_shift`` = its change from alpha 0;
      ``pair_gap`` = mean projection of the positive minus the negative sides; ``projection_shift_in_gaps`` = the
      shift in units of the unsteered pair gap (1 = as far as the gap between the two sides of a pair).
      ``probe`` is ``(layer, vector)`` for all languages or ``{lang: (layer, vector)}``; by default the deepest
      steered layer and its steering vector.
    * ``behaviour_score``: mean over held-out pairs ``(positive, negative)`` of the mean token log-prob of the
      positive minus that of the negative sentence; ``behaviour_shift`` = change from alpha 0.
    * ``perplexity`` of the language's neutral texts and ``perplexity_ratio`` to alpha 0.
    """
    if not alphas:
        raise ConfigError("no alpha values to sweep", fix="pass at least one alpha")
    layers = decoder_layers(model)
    _check_layers(vectors, len(layers))
    deepest = max(int(L) for L in vectors)
    label = ",".join(str(int(L)) for L in sorted(vectors))
    rows = []
    for lang in sorted(held_out):
        pairs = list(held_out[lang])
        if not pairs:
            raise ConfigError(f"no held-out pairs for language {lang!r}", where="measure_steering(held_out=...)")
        p_layer, p_vec = (probe.get(lang) if isinstance(probe, Mapping) else probe) or (deepest, vectors[deepest])
        u = _unit_probe(p_vec)
        neutral_texts = list(neutral.get(lang, ()))
        measure = partial(
            _steered_measures, model, tokenizer, vectors, pairs, neutral_texts, p_layer, u, batch_size, max_length
        )
        base = measure(0.0)
        for alpha in alphas:
            m = base if alpha == 0 else measure(float(alpha))
            rows.append(_steering_row(lang, label, alpha, p_layer, len(pairs), len(neutral_texts), m, base))
    return pl.DataFrame(rows)


def sweep_steering(
    model: nn.Module,
    tokenizer,
    vectors_by_layer: Mapping[int, object],
    layer_sets: Sequence[Sequence[int]],
    alphas: Sequence[float],
    held_out: Mapping[str, Sequence[tuple[str, str]]],
    neutral: Mapping[str, Sequence[str]],
    *,
    probe: Probe | Mapping[str, Probe] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> pl.DataFrame:
    """:func:`measure_steering` for each set of layers (each steered with its own layer's vector from
    ``vectors_by_layer``), stacked; the ``layers`` column names the set."""
    frames = []
    for layer_set in layer_sets:
        missing = [L for L in layer_set if L not in vectors_by_layer]
        if missing:
            raise ConfigError(
                f"no steering vector for layer(s) {missing}",
                where="sweep_steering(layer_sets=...)",
                fix="pass vectors_by_layer for every layer you steer",
            )
        frames.append(
            measure_steering(
                model,
                tokenizer,
                {L: vectors_by_layer[L] for L in layer_set},
                alphas,
                held_out,
                neutral,
                probe=probe,
                batch_size=batch_size,
                max_length=max_length,
            )
        )
    return pl.concat(frames)
