"""The one layer convention: layer k = Hugging Face ``hidden_states[k]`` for the MLC capture, extraction and the
analyses alike, the last index being the final state after the final norm; one resolver from a config's layer spec
to that index; one dotted-key setter; one position-ids helper."""

from __future__ import annotations

import pytest
import torch

from raysafe.config import set_path
from raysafe.errors import ConfigError, ModelError
from raysafe.extract.stages import Extractor
from raysafe.models.layers import (
    decoder_body,
    decoder_layers,
    final_norm,
    hidden_state_hooks,
    position_ids_from_mask,
    resolve_layer,
)
from raysafe.models.tiny import tiny_model, tiny_tokenizer
from raysafe.train.collate import PreferenceCollator
from raysafe.train.config import MLCConfig
from raysafe.train.forward import policy_forward

NUM_LAYERS = 4
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


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_every_hooked_layer_is_the_hf_hidden_state_and_the_last_one_is_post_norm(arch):
    model = tiny_model(arch, num_layers=NUM_LAYERS, hidden=32, seed=2)
    tok = tiny_tokenizer(padding_side="left")
    enc = tok(["Как вскрыть замок?", "Hi", "怎么撬锁？"], return_tensors="pt", padding=True)
    plain = model(**enc, output_hidden_states=True)  # (transformers installs its own recording hooks on first use)
    modules = [*decoder_layers(model), final_norm(model)]
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]
    got: dict[int, torch.Tensor] = {}
    with hidden_state_hooks(model, range(NUM_LAYERS + 1), got.__setitem__):
        hooked = model(**enc, output_hidden_states=True).hidden_states
    assert sorted(got) == list(range(NUM_LAYERS + 1))
    for k in range(NUM_LAYERS + 1):
        assert torch.equal(got[k], hooked[k]), k  # the very tensors HF reports, in the same forward
        torch.testing.assert_close(got[k], plain.hidden_states[k], atol=0, rtol=0)
    final = got[NUM_LAYERS]
    assert torch.equal(final, plain.hidden_states[-1])
    # post-norm: the final norm applied to the last block's raw output, not that raw output itself
    raw: dict[int, torch.Tensor] = {}
    handle = decoder_layers(model)[-1].register_forward_hook(
        lambda _m, _i, o: raw.__setitem__(0, o[0] if isinstance(o, tuple) else o)
    )
    try:
        model(**enc)
    finally:
        handle.remove()
    assert not torch.allclose(raw[0], final)
    torch.testing.assert_close(final_norm(model)(raw[0]), final, atol=0, rtol=0)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] == hooks_before  # all removed


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
@pytest.mark.parametrize("spec", [0.5, "final"])
def test_mlc_capture_and_extraction_read_the_same_tensor_for_the_same_layer(request, fixture, spec):
    """The layer number the MLC loss trains on names the very representation extraction (and so the sweep's held-out
    measure and the analyses) reads: a middle layer and the final post-norm state, on the same token ids."""
    ext = Extractor({"path": str(request.getfixturevalue(fixture)), "dtype": "float32"}, {"positions": ["last"]}, [])
    depth = len(decoder_layers(ext.model))
    layer = MLCConfig(layer=spec).resolve_layer(depth)
    assert layer == (depth // 2 if spec == 0.5 else depth)
    ext.layers = [layer]
    collator = PreferenceCollator(tiny_tokenizer(padding_side="left", chat_template=True), max_length=96)
    batch = collator(SAMPLES)
    b, m = batch["n_pairs"], batch["m"]
    with torch.no_grad():
        mlc = policy_forward(ext.model, batch, mlc_layer=layer).variant_hidden  # [B, m, H]
    rows = batch["attention_mask"][2 * b :].bool()
    variant_ids = [batch["input_ids"][2 * b + r][rows[r]].tolist() for r in range(b * m)]
    extracted = torch.from_numpy(ext.extract(variant_ids)[(layer, "last")]).reshape(b, m, -1)
    torch.testing.assert_close(mlc.float(), extracted, atol=2e-5, rtol=1e-5)
    with torch.no_grad():  # and both are HF's hidden_states[layer] of the unpadded prompt
        ref = torch.stack(
            [
                ext.model(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states[layer][0, -1]
                for x in variant_ids
            ]
        )
    torch.testing.assert_close(extracted.reshape(b * m, -1), ref, atol=2e-5, rtol=1e-5)


def test_resolve_layer_is_the_one_mapping_from_a_layer_spec_to_an_index():
    assert [resolve_layer(s, 18) for s in (0, 9, 18, 0.5, 1.0, 0.01, "final")] == [0, 9, 18, 9, 18, 1, 18]
    assert MLCConfig(layer="final").resolve_layer(28) == 28  # the released Qwen2.5-7B setting, hs_layer_index 28
    for bad, needle in ((19, "beyond the model's depth (18"), (-1, "negative"), (1.5, "(0, 1]"), (0.0, "(0, 1]")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
            resolve_layer(bad, 18, where="mlc.layer")
        assert e.value.where == "mlc.layer" and "final" in e.value.fix
    with pytest.raises(ConfigError, match="neither"):
        resolve_layer("last", 18)
    with pytest.raises(ConfigError):
        resolve_layer(True, 18)


def test_hooks_refuse_layers_beyond_the_depth():
    model = tiny_model("llama", num_layers=2, hidden=32)
    with pytest.raises(ModelError, match="out of range"):
        with hidden_state_hooks(model, [3], lambda k, h: None):
            pass


def test_decoder_finder_sees_through_wrappers():
    model = tiny_model("llama", num_layers=2, hidden=32)

    class Engine(torch.nn.Module):  # what a DeepSpeed engine / DDP looks like: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert decoder_body(Engine(model)) is model.model
    assert decoder_layers(Engine(model)) is model.model.layers
    assert decoder_layers(model.model) is model.model.layers
    assert final_norm(Engine(model)) is model.model.norm


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 1, 1], [0, 1, 2, 3, 4]]


def test_set_path_is_the_one_dotted_setter():
    tree = {"a": {"b": 1}, "xs": [{"y": 1}, {"y": 2}], "n": None}
    set_path(tree, "a.c.d", 3)
    set_path(tree, "xs.1.y", 5)
    set_path(tree, "n.k", "v")
    assert tree == {"a": {"b": 1, "c": {"d": 3}}, "xs": [{"y": 1}, {"y": 5}], "n": {"k": "v"}}
    for bad in ("a.b.c", "xs.7.y", "xs.z"):
        with pytest.raises(ValueError):
            set_path(tree, bad, 0)
