"""One inference model over several GPUs of an actor: the placement plan (pure), the weights' size it is given, what
``from_pretrained`` receives, and the refusal before loading when the weights cannot fit."""

from __future__ import annotations

import pytest
import torch

from raysafe.config import ModelSpec, RaySpec
from raysafe.errors import ModelError
from raysafe.models import loading, placement
from raysafe.models.placement import ACTIVATION_HEADROOM, GIB, GpuBudget, plan_placement


def test_one_gpu_that_fits_needs_no_device_map():
    assert plan_placement("m", 10 * GIB, [GpuBudget(0, 80 * GIB)]) == {}


def test_several_gpus_get_a_balanced_map_capped_below_each_gpu():
    gpus = [GpuBudget(0, 80 * GIB), GpuBudget(1, 80 * GIB)]
    plan = plan_placement("llama-70b", 120 * GIB, gpus)
    cap = int(80 * GIB * (1 - ACTIVATION_HEADROOM))
    assert plan == {"device_map": "balanced", "max_memory": {0: cap, 1: cap}}


def test_a_model_too_big_is_refused_with_its_size_the_gpus_and_the_gpu_count_needed():
    gpus = [GpuBudget(0, 80 * GIB), GpuBudget(1, 80 * GIB)]
    with pytest.raises(ModelError) as e:
        plan_placement("llama-70b", 340 * GIB, gpus)  # 340 GiB: 340 / (80·0.8) → 6 GPUs
    msg = str(e.value)
    assert "llama-70b" in msg and "340.0 GiB" in msg and "cuda:1 80.0 GiB" in msg and "128.0 GiB" in msg
    assert "num_gpus_per_actor to 6" in msg and "bfloat16" in msg and "vllm" in msg


def test_the_headroom_decides_at_the_edge():
    gpu = [GpuBudget(0, 10 * GIB)]
    usable = gpu[0].usable
    assert plan_placement("m", usable, gpu) == {}
    with pytest.raises(ModelError):
        plan_placement("m", usable + 1, gpu)


def test_a_shared_gpu_counts_only_the_actors_share():
    half = [GpuBudget(0, 24 * GIB, share=0.5)]
    assert half[0].usable == int(24 * GIB * 0.5 * (1 - ACTIVATION_HEADROOM))
    with pytest.raises(ModelError, match="num_gpus_per_actor = 0.5"):
        plan_placement("m", 12 * GIB, half)


def test_no_visible_gpu_is_an_error():
    with pytest.raises(ModelError, match="sees no GPU"):
        plan_placement("m", 1, [])


def test_gpus_per_actor_take_whole_numbers_above_one_and_fractions_below():
    assert RaySpec(num_gpus_per_actor=4).num_gpus_per_actor == 4
    assert RaySpec(num_gpus_per_actor=0.25).num_gpus_per_actor == 0.25
    with pytest.raises(ValueError, match="whole number"):
        RaySpec(num_gpus_per_actor=1.5)


def test_weight_count_from_safetensors_headers_and_from_the_config_match_the_model(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    n = sum(p.numel() for p in model.parameters())
    assert placement.safetensors_numel(tiny_llama_dir) == n
    assert placement.config_numel(AutoConfig.from_pretrained(tiny_llama_dir)) == n
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")  # several shards and an index
    assert (sharded / "model.safetensors.index.json").is_file()
    assert placement.safetensors_numel(sharded) == n
    assert placement.safetensors_numel(tmp_path) is None


def test_cpu_and_a_training_workers_one_gpu_keep_the_plain_load(tiny_llama_dir):
    spec = ModelSpec(path=str(tiny_llama_dir))
    resolved = loading.resolve(spec)
    assert loading.gpu_placement(spec, resolved, torch.device("cpu"), torch.float32) == {}
    assert loading.gpu_placement(spec, resolved, torch.device("cuda", 0), torch.bfloat16) == {}


def _fake_gpus(monkeypatch, n: int, total: int) -> None:
    monkeypatch.setattr(
        placement, "actor_gpus", lambda device: [GpuBudget(i, total) for i in range(n)] if device.index is None else []
    )


def test_the_plan_is_what_from_pretrained_receives_on_an_actor_with_two_gpus(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    _fake_gpus(monkeypatch, 2, GIB)
    seen = {}

    def capture(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", capture)
    with pytest.raises(RuntimeError, match="stop before loading"):
        loading.load_causal_lm(ModelSpec(path=str(tiny_llama_dir)), "cuda")
    cap = int(GIB * (1 - ACTIVATION_HEADROOM))
    assert seen["device_map"] == "balanced" and seen["max_memory"] == {0: cap, 1: cap}
    assert seen["dtype"] == torch.bfloat16


def test_a_model_that_cannot_fit_is_refused_before_any_weight_is_read(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    _fake_gpus(monkeypatch, 2, 1 << 16)  # 64 KiB GPUs: the tiny model's ~100k bf16 weights do not fit
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ModelError, match="does not fit the actor's GPUs"):
        loading.load_causal_lm(ModelSpec(path=str(tiny_llama_dir), name="tiny"), "cuda")


def test_a_model_loaded_by_device_map_extracts_what_the_plain_one_does(tiny_llama_dir):
    """The device-map branch of loading on CPU: ``from_pretrained`` with a per-module map, then
    :func:`placed_for_inference`, then extraction's hooks read the same vectors as from the model loaded whole.
    (One CPU device only: moving activations between GPUs is accelerate's, and needs GPUs to be exercised.)"""
    from transformers import AutoModelForCausalLM

    from raysafe.extract.hidden import pooled_hidden_states

    spec = ModelSpec(path=str(tiny_llama_dir), dtype="float32")
    plain = loading.load_causal_lm(spec, "cpu")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(plain.config.num_hidden_layers)})
    split = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, device_map=device_map)
    split = loading.placed_for_inference(spec, split, torch.device("cuda"), {"device_map": device_map})
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    a = pooled_hidden_states(plain, ids, mask, [1, 2, 4], ("last", "mean"))
    b = pooled_hidden_states(split, ids, mask, [1, 2, 4], ("last", "mean"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_modules_offloaded_off_the_gpus_are_refused():
    class M:
        hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": "cpu", "lm_head": "disk"}

    with pytest.raises(ModelError, match="model.layers.1") as e:
        placement.check_placed("m", M())
    assert "lm_head" in str(e.value)
    M.hf_device_map = {"model.embed_tokens": 0, "lm_head": 1}
    placement.check_placed("m", M())
