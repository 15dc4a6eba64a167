"""policy_forward against the plain full forward of tiny Llama and Gemma 3 models, padding sides and layers."""

from __future__ import annotations

import pytest
import torch

from raysafe.errors import DataError, ModelError
from raysafe.models.tiny import tiny_model, tiny_tokenizer
from raysafe.train.collate import PreferenceCollator
from raysafe.train.forward import policy_forward, reference_logps
from raysafe.train.logprobs import sequence_logprobs

SAMPLES = [
    {
        "group_id": "a",
        "prompt": "How do I pick a lock?",
        "chosen": "I can't help with that.",
        "rejected": "First, insert a tension wrench",
        "variants": [("en", "How do I pick a lock?"), ("ru", "Как вскрыть замок?"), ("zh", "怎么撬锁？")],
    },
    {
        "group_id": "b",
        "prompt": "Hi",
        "chosen": "Hello! How can I help you today?",
        "rejected": "Go away.",
        "variants": [("en", "Hi"), ("ar", "مرحبا"), ("hi", "नमस्ते, आप कैसे हैं?")],
    },
]
NUM_LAYERS = 3


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, num_layers=NUM_LAYERS, hidden=32, seed=1) for arch in ("llama", "gemma3")}


def batch_for(side: str, template: bool = True):
    tok = tiny_tokenizer(padding_side=side, chat_template=template)
    return PreferenceCollator(tok, max_length=96, max_prompt_length=64)(SAMPLES)


def assert_logps_close(a, b, ntok):
    """Summed log-probs agree per token within 1e-5 (and the sums within fp32 rounding of their size)."""
    n = ntok.clamp(min=1).to(a.dtype)
    torch.testing.assert_close(a / n, b / n, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def unpadded_row(batch, row):
    keep = batch["attention_mask"][row].bool()
    return batch["input_ids"][row, keep][None], batch["labels"][row, keep][None]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_logps_match_full_forward_and_unpadded_rows(models, arch, side):
    model = models[arch]
    batch = batch_for(side)
    b = batch["n_pairs"]
    out = policy_forward(model, batch, mlc_layer=2)
    full = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    )
    sums, ntok = sequence_logprobs(full.logits[: 2 * b], batch["labels"][: 2 * b])
    assert_logps_close(torch.cat([out.chosen_logps, out.rejected_logps]), sums, ntok)
    assert torch.equal(torch.cat([out.chosen_ntok, out.rejected_ntok]), ntok)
    torch.testing.assert_close(out.chosen_nll_mean, -sums[:b].sum() / ntok[:b].sum(), atol=1e-6, rtol=0)
    for row in range(2 * b):  # padding is exact: each row alone, unpadded, gives the same value
        ids, labels = unpadded_row(batch, row)
        alone, _ = sequence_logprobs(model(input_ids=ids).logits, labels)
        assert_logps_close(sums[row : row + 1], alone, ntok[row : row + 1])
    without = policy_forward(model, batch, mlc_layer=None)
    assert without.variant_hidden is None
    assert_logps_close(without.chosen_logps, out.chosen_logps, out.chosen_ntok)
    assert_logps_close(without.rejected_logps, out.rejected_logps, out.rejected_ntok)
    ref_c, ref_r = reference_logps(model, batch)
    assert_logps_close(ref_c, out.chosen_logps, out.chosen_ntok)
    assert_logps_close(ref_r, out.rejected_logps, out.rejected_ntok)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_variant_hidden_states_match_hf_hidden_states(models, arch, side):
    model = models[arch]
    batch = batch_for(side)
    b, m = batch["n_pairs"], batch["m"]
    layers = (0, 2, NUM_LAYERS)
    last = {L: policy_forward(model, batch, mlc_layer=L, pooling="last").variant_hidden for L in layers}
    mean = {L: policy_forward(model, batch, mlc_layer=L, pooling="mean").variant_hidden for L in layers}
    assert last[0].shape == (b, m, 32) and mean[0].shape == (b, m, 32)
    for i in range(b):
        for j in range(m):
            ids, _ = unpadded_row(batch, 2 * b + i * m + j)
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            for L in layers:  # the last one, L = depth, is the final state after the final norm, as in HF
                torch.testing.assert_close(last[L][i, j], states[L][0, -1], atol=1e-5, rtol=0)
                torch.testing.assert_close(mean[L][i, j], states[L][0].mean(0), atol=1e-5, rtol=0)


def test_lm_head_sees_only_scored_answer_positions(models):
    model = models["llama"]
    batch = batch_for("left")
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    try:
        policy_forward(model, batch, mlc_layer=1)
    finally:
        handle.remove()
    b = batch["n_pairs"]
    scored = int((batch["labels"][: 2 * b, 1:] != -100).sum())
    assert seen == [torch.Size([scored, 32])]
    assert (batch["labels"][2 * b :] == -100).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradients_match_full_forward_and_chunked_head(models, arch):
    model = models[arch]
    batch = batch_for("left")
    b = batch["n_pairs"]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    out = policy_forward(model, batch, mlc_layer=2)
    ours = grads((out.chosen_logps - 0.5 * out.rejected_logps).sum() + out.variant_hidden.pow(2).mean())
    chunked = policy_forward(model, batch, mlc_layer=2, head_chunk=7)
    assert_logps_close(chunked.chosen_logps, out.chosen_logps, out.chosen_ntok)
    chunked_grads = grads(
        (chunked.chosen_logps - 0.5 * chunked.rejected_logps).sum() + chunked.variant_hidden.pow(2).mean()
    )
    full = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
    )
    sums, _ = sequence_logprobs(full.logits[: 2 * b], batch["labels"][: 2 * b])
    rows = torch.arange(2 * b, full.hidden_states[2].shape[0])
    pooled = full.hidden_states[2][rows, batch["variant_last_index"]]
    reference = grads((sums[:b] - 0.5 * sums[b:]).sum() + pooled.pow(2).mean())
    for g_ours, g_chunk, g_ref in zip(ours, chunked_grads, reference):
        if g_ref is None:
            continue
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g_chunk, g_ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_final_logit_softcapping_is_applied(models):
    model = models["gemma3"]
    batch = batch_for("right")
    b = batch["n_pairs"]
    model.config.final_logit_softcapping = 0.5
    try:
        out = policy_forward(model, batch, mlc_layer=None)
        full = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        )
    finally:
        model.config.final_logit_softcapping = None
    sums, ntok = sequence_logprobs(full.logits[: 2 * b], batch["labels"][: 2 * b])
    assert_logps_close(out.chosen_logps, sums[:b], ntok[:b])


def test_bad_layer_and_bad_batch(models):
    model = models["llama"]
    batch = batch_for("left")
    with pytest.raises(ModelError):
        policy_forward(model, batch, mlc_layer=NUM_LAYERS + 1)
    broken = dict(batch, m=2)
    with pytest.raises(DataError, match="rows"):
        policy_forward(model, broken, mlc_layer=1)
