"""Extraction equals a plain one-example-at-a-time transformers forward with output_hidden_states=True."""

from __future__ import annotations

import pytest
import torch
from conftest import MULTISCRIPT

from raysafe.extract.hidden import pooled_hidden_states
from raysafe.extract.stages import Extractor

TEXTS = [t for texts in MULTISCRIPT.values() for t in texts[:2]]


def reference(model, tok, texts, layers):
    """{(layer, position): [n, hidden]} from unbatched HF forwards."""
    out = {}
    for t in texts:
        enc = tok([t], return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        for layer in layers:
            out.setdefault((layer, "last"), []).append(hs[layer][0, -1])
            out.setdefault((layer, "mean"), []).append(hs[layer][0].mean(0))
    return {k: torch.stack(v) for k, v in out.items()}


def max_rel_err(got, ref):
    assert got, "nothing extracted"
    return max(((got[k] - ref[k]).norm(dim=-1) / ref[k].norm(dim=-1)).max().item() for k in got)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("positions", [["last", "mean"], ["last"]])  # last only: the deepest MLP runs on last tokens
def test_pooled_states_match_unbatched_forward(arch, side, positions):
    from raysafe.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model(arch), tiny_tokenizer(padding_side=side)
    layers = list(range(model.config.num_hidden_layers + 1))
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any(), "the test needs padded rows"
    got = pooled_hidden_states(model, enc.input_ids, enc.attention_mask, layers, positions)
    assert {p for _, p in got} == set(positions)
    assert max_rel_err(got, reference(model, tok, TEXTS, layers)) < 1e-4


@pytest.mark.parametrize("deepest", [2, 4])
def test_last_only_runs_the_deepest_mlp_on_one_token_per_row(deepest):
    from raysafe.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("gemma3", num_layers=4), tiny_tokenizer()
    mlps = [layer.mlp for layer in model.model.layers]
    rows_seen = {}
    hooks = [
        m.register_forward_hook(lambda _m, i, _o, k=k: rows_seen.__setitem__(k, i[0].shape[:2]))
        for k, m in enumerate(mlps)
    ]
    enc = tok(TEXTS[:5], return_tensors="pt", padding=True)
    pooled_hidden_states(model, enc.input_ids, enc.attention_mask, [1, deepest], ["last"])
    for h in hooks:
        h.remove()
    width = enc.input_ids.shape[1]
    assert rows_seen == {**{k: (5, width) for k in range(deepest - 1)}, deepest - 1: (5, 1)}
    assert [layer.mlp for layer in model.model.layers] == mlps  # the stand-in is removed again


def test_forward_stops_at_the_deepest_requested_layer():
    from raysafe.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", num_layers=6), tiny_tokenizer()
    ran = []
    hooks = [layer.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, layer in enumerate(model.model.layers)]
    head = model.lm_head.register_forward_hook(lambda *_a: ran.append("head"))
    enc = tok(TEXTS[:3], return_tensors="pt", padding=True)
    pooled_hidden_states(model, enc.input_ids, enc.attention_mask, [1, 3], ["last"])
    for h in hooks + [head]:
        h.remove()
    assert ran == [0, 1, 2]  # decoder layers 1..3 ran, nothing after, never the LM head


@pytest.mark.parametrize("side", ["right", "left"])
def test_extractor_token_budget_batches_are_exact(tiny_gemma_dir, side):
    """Length-sorted token-budget batches (several of them) scatter back to input order exactly."""
    ext = Extractor(
        {"path": str(tiny_gemma_dir)},
        {"max_tokens_per_batch": 64, "padding_side": side, "positions": ["last", "mean"]},
        layers=[0, 2, 4],
    )
    ids = [ext.tok(t)["input_ids"] for t in TEXTS]
    got = {k: torch.from_numpy(v) for k, v in ext.extract(ids).items()}
    ref = reference(ext.model, ext.tok, TEXTS, [0, 2, 4])
    assert max_rel_err(got, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("side", "positions"), [("right", ["last", "mean"]), ("left", ["last", "mean"]), ("right", ["last"])]
)
def test_gemma3_270m_matches_unbatched_forward(side, positions):
    """The packaged Gemma 3 270M: 6+ scripts, every 3rd layer and the last (after the final norm)."""
    ext = Extractor({"path": "gemma3-270m"}, {"padding_side": side, "positions": positions}, layers=[0, 3, 9, 17, 18])
    texts = [MULTISCRIPT[lang][0] for lang in MULTISCRIPT]
    ids = [ext.tok(t)["input_ids"] for t in texts]
    got = {k: torch.from_numpy(v) for k, v in ext.extract(ids).items()}
    ref = reference(ext.model, ext.tok, texts, [0, 3, 9, 17, 18])
    assert max_rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_extractor_loads_no_tokenizer_and_the_pad_id_does_not_change_vectors(tiny_gemma_dir, side):
    """The model actor gets token ids: it never loads the tokenizer (4 s for Gemma 3's 262k vocabulary), and the id
    that fills padded positions, masked out and never pooled, leaves every vector as it is."""
    import numpy as np

    ext = Extractor(
        {"path": str(tiny_gemma_dir)},
        {"max_tokens_per_batch": 64, "padding_side": side, "positions": ["last", "mean"]},
        layers=[0, 2, 4],
    )
    ids = [list(range(3, 3 + n)) for n in (5, 9, 2, 7, 12)]
    first = ext.extract(ids)
    ext.pad_id = 17
    second = ext.extract(ids)
    assert "tok" not in vars(ext)
    for key in first:
        np.testing.assert_allclose(second[key], first[key], rtol=1e-5, atol=1e-6)


def test_pad_token_id_falls_back_to_zero_outside_the_vocabulary():
    from types import SimpleNamespace

    from raysafe.extract.stages import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=5, vocab_size=10)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, vocab_size=10)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=-1, vocab_size=10)) == 0
    nested = SimpleNamespace(text_config=SimpleNamespace(pad_token_id=3, vocab_size=10), pad_token_id=None)
    assert pad_token_id(nested) == 3
