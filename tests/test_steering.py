"""Steering hook and steering measurements on tiny random Llama / Gemma 3 models."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from raysafe.errors import ConfigError, ModelError
from raysafe.models.layers import decoder_layers
from raysafe.models.steering import (
    measure_steering,
    steering,
    sweep_steering,
    text_stats,
)
from raysafe.models.tiny import tiny_model, tiny_tokenizer

HIDDEN = 64
N_LAYERS = 4
TEXTS = ["The cat sat on the mat.", "Ку", "日本語のテキスト", "ok"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded; on a busy machine torch's thread pool costs more than it gives."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_model(request.param, num_layers=N_LAYERS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=N_LAYERS, hidden=HIDDEN)


def batch(padding_side: str):
    tok = tiny_tokenizer(padding_side=padding_side)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    return enc


def hidden(model, enc, **kw):
    with torch.no_grad():
        return model(**enc, output_hidden_states=True, **kw)


def vec(seed: int = 0) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hooked_layer_output_changes_by_alpha_v_at_non_pad_positions_only(model, padding_side):
    enc = batch(padding_side)
    alpha, v, L = 2.5, vec(1), 2
    base = hidden(model, enc)
    with steering(model, {L: v}, alpha):
        steered = hidden(model, enc)
    keep = enc["attention_mask"].bool()
    diff = steered.hidden_states[L] - base.hidden_states[L]
    torch.testing.assert_close(diff[keep], (alpha * v).expand(int(keep.sum()), HIDDEN), rtol=0, atol=1e-5)
    assert torch.equal(steered.hidden_states[L][~keep], base.hidden_states[L][~keep])
    for earlier in range(L):
        assert torch.equal(steered.hidden_states[earlier], base.hidden_states[earlier])
    assert not torch.equal(steered.logits, base.logits)  # later layers legitimately change


def test_each_of_several_layers_gets_its_own_vector(model):
    enc = batch("left")
    keep = enc["attention_mask"].bool()
    v1, v3 = vec(2), vec(3)
    with steering(model, {1: v1}, 1.5):
        only_first = hidden(model, enc)
    with steering(model, {1: v1, 3: v3}, 1.5):
        both = hidden(model, enc)
    assert torch.equal(both.hidden_states[1], only_first.hidden_states[1])
    assert torch.equal(both.hidden_states[2], only_first.hidden_states[2])
    diff = both.hidden_states[3] - only_first.hidden_states[3]
    torch.testing.assert_close(diff[keep], (1.5 * v3).expand(int(keep.sum()), HIDDEN), rtol=0, atol=1e-5)
    assert torch.equal(diff[~keep], torch.zeros_like(diff[~keep]))


def test_outputs_are_bit_identical_after_removal(model):
    enc = batch("left")
    layers = decoder_layers(model)
    before_hooks = [len(layer._forward_hooks) for layer in layers]
    base = hidden(model, enc)
    with steering(model, {2: vec(4), 3: vec(5)}, 4.0):
        hidden(model, enc)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, {1: vec(6)}, 4.0):
            raise RuntimeError("boom")
    after = hidden(model, enc)
    assert torch.equal(after.logits, base.logits)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, base.hidden_states))
    assert [len(layer._forward_hooks) for layer in layers] == before_hooks


def test_generation_with_steering_attached_left_padded_batch(model):
    tok = tiny_tokenizer(padding_side="left")
    enc = tok(["Hello there", "Привет", "x"], padding=True, return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = model.generate(**enc, **kw)
        with steering(model, {2: vec(7)}, 0.0):
            zero = model.generate(**enc, **kw)
        with steering(model, {2: vec(7)}, 8.0):
            out = dict(return_dict_in_generate=True, output_logits=True)
            cached = model.generate(**enc, use_cache=True, **out, **kw)
            uncached = model.generate(**enc, use_cache=False, **out, **kw)
        after = model.generate(**enc, **kw)
    assert cached.sequences.shape == (3, enc["input_ids"].shape[1] + 4)
    assert torch.equal(zero, plain) and torch.equal(after, plain)
    assert not torch.equal(cached.sequences, plain)
    # with a KV cache only the new token is fed each step: it must be steered exactly like the full re-run
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_full in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(step_cached, step_full, rtol=0, atol=1e-4)


def test_bad_steering_inputs(llama):
    v = vec(0)
    with pytest.raises(ModelError, match="out of range"):
        with steering(llama, {0: v}, 1.0):
            pass
    with pytest.raises(ModelError, match="out of range"):
        with steering(llama, {N_LAYERS + 1: v}, 1.0):
            pass
    with pytest.raises(ModelError, match="shape"):
        with steering(llama, {1: torch.zeros(HIDDEN + 1)}, 1.0):
            pass
    with pytest.raises(ModelError, match="non-finite"):
        with steering(llama, {1: torch.full((HIDDEN,), float("nan"))}, 1.0):
            pass
    with pytest.raises(ConfigError, match="alpha"):
        with steering(llama, {1: v}, float("inf")):
            pass
    with pytest.raises(ConfigError):
        with steering(llama, {}, 1.0):
            pass
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ModelError, match="2-D"), steering(llama, {1: v}, 1.0), torch.no_grad():
        llama(input_ids=ids, attention_mask=torch.ones(1, 1, 3, 3))
    assert all(len(layer._forward_hooks) == 0 for layer in decoder_layers(llama))


# ------------------------------------------------------------------------------------------- measurements


def hf_mean_logprob(model, tok, text: str) -> float:
    ids = torch.tensor([[tok.bos_token_id] + tok(text)["input_ids"]])
    with torch.no_grad():
        return -float(model(input_ids=ids, labels=ids).loss)


def test_text_stats_do_not_depend_on_padding(llama):
    left = text_stats(llama, tiny_tokenizer(padding_side="left"), TEXTS, probe_layer=2)
    right = text_stats(llama, tiny_tokenizer(padding_side="right"), TEXTS, probe_layer=2)
    single = [text_stats(llama, tiny_tokenizer(), [t], probe_layer=2) for t in TEXTS]
    np.testing.assert_array_equal(left.n_tokens, right.n_tokens)
    np.testing.assert_allclose(left.logprob_sum, right.logprob_sum, atol=1e-4)
    np.testing.assert_allclose(left.logprob_sum, [s.logprob_sum[0] for s in single], atol=1e-4)
    np.testing.assert_allclose(left.last_state, np.concatenate([s.last_state for s in single]), atol=1e-4)
    tok = tiny_tokenizer()
    for i, t in enumerate(TEXTS):
        assert left.logprob_sum[i] / left.n_tokens[i] == pytest.approx(hf_mean_logprob(llama, tok, t), abs=1e-5)


def test_measurements_against_direct_computation(llama):
    tok = tiny_tokenizer(padding_side="left")
    v = vec(8).numpy()
    alphas = [-3.0, 0.0, 3.0]
    held_out = {
        "en": [("I hate you", "I like you"), ("You are awful", "You are kind")],
        "de": [("Ich hasse dich", "Ich mag dich")],
    }
    neutral = {"en": ["The weather is mild today."], "de": ["Das Wetter ist mild."]}
    df = measure_steering(llama, tok, {2: v}, alphas, held_out, neutral)
    assert df.height == 6 and set(df["lang"]) == {"en", "de"}
    zero = df.filter(pl.col("alpha") == 0.0)
    assert (zero["projection_shift"] == 0).all() and (zero["behaviour_shift"] == 0).all()
    assert (zero["perplexity_ratio"] == 1).all()
    # probe = the steered layer and its own vector: every last-token state moves by alpha * |v| along v
    for alpha, shift in df.select("alpha", "projection_shift").iter_rows():
        assert shift == pytest.approx(alpha * np.linalg.norm(v), rel=1e-4, abs=1e-4)
    # the same push moves both sides of a pair, so the gap between them does not change; the shift in gaps is the
    # shift divided by the unsteered gap
    for _lang, part in df.group_by("lang"):
        assert np.allclose(part["pair_gap"], part["pair_gap"][0], atol=1e-4)
        base_gap = part.filter(pl.col("alpha") == 0.0)["pair_gap"][0]
        np.testing.assert_allclose(part["projection_shift_in_gaps"], part["projection_shift"] / base_gap, rtol=1e-9)
    # behaviour score and perplexity equal the model's own loss under the same steering
    plain_tok = tiny_tokenizer()
    with steering(llama, {2: v}, 3.0):
        pos = [hf_mean_logprob(llama, plain_tok, p) for p, _ in held_out["de"]]
        neg = [hf_mean_logprob(llama, plain_tok, n) for _, n in held_out["de"]]
        ppl = math.exp(-hf_mean_logprob(llama, plain_tok, neutral["de"][0]))
    row = df.filter((pl.col("lang") == "de") & (pl.col("alpha") == 3.0)).row(0, named=True)
    assert row["behaviour_score"] == pytest.approx(np.mean(pos) - np.mean(neg), abs=1e-5)
    assert row["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_steering_towards_a_token_raises_its_sentences_likelihood(llama):
    """Adding E[a] - E[b] (tied embeddings = unembeddings) after the last layer raises the logit of 'a' over
    'b' at every position, so the behaviour score of ('aaaa', 'bbbb') must go up."""
    tok = tiny_tokenizer()
    emb = llama.get_input_embeddings().weight.detach()
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    v = (emb[a] - emb[b]).numpy()
    df = measure_steering(
        llama,
        tok,
        {N_LAYERS: v},
        [0.0, 100.0, 400.0],
        {"xx": [("aaaaaa", "bbbbbb")]},
        {"xx": ["the dog is in the house"]},
    )
    shifts = df.sort("alpha")["behaviour_shift"].to_list()
    assert shifts[0] == 0.0 and 0 < shifts[1] < shifts[2]


def test_sweep_over_layer_sets_and_probe_per_language(llama):
    tok = tiny_tokenizer()
    vectors = {1: vec(9).numpy(), 3: vec(10).numpy()}
    probe = {"en": (4, vec(11).numpy()), "de": (4, vec(12).numpy())}
    held_out = {"en": [("bad", "good")], "de": [("schlecht", "gut")]}
    df = sweep_steering(llama, tok, vectors, [[1], [1, 3]], [0.0, 2.0], held_out, {}, probe=probe)
    assert df.height == 2 * 2 * 2
    assert set(df["layers"]) == {"1", "1,3"} and set(df["probe_layer"]) == {4}
    assert df["perplexity"].is_nan().all()
    with pytest.raises(ConfigError, match="no steering vector"):
        sweep_steering(llama, tok, vectors, [[2]], [1.0], held_out, {})
    with pytest.raises(ConfigError, match="alpha"):
        measure_steering(llama, tok, vectors, [], held_out, {})


def test_probe_states_without_the_lm_head_match_the_full_pass(llama):
    tok = tiny_tokenizer()
    full = text_stats(llama, tok, TEXTS, probe_layer=3, batch_size=3)
    body = text_stats(llama, tok, TEXTS, probe_layer=3, batch_size=3, logprobs=False)
    np.testing.assert_array_equal(body.last_state, full.last_state)
    np.testing.assert_array_equal(body.n_tokens, full.n_tokens)
    assert np.isnan(body.logprob_sum).all()
    with steering(llama, {2: vec(3)}, 2.0):
        steered = text_stats(llama, tok, TEXTS, probe_layer=2, logprobs=False)
    plain = text_stats(llama, tok, TEXTS, probe_layer=2, logprobs=False)
    np.testing.assert_allclose(
        steered.last_state - plain.last_state, np.tile(2.0 * vec(3).numpy(), (len(TEXTS), 1)), rtol=0, atol=1e-5
    )
    with pytest.raises(ConfigError, match="probe_layer"):
        text_stats(llama, tok, TEXTS, logprobs=False)
