"""The generation backends (``hf``, ``vllm``): what they share (prompt token ids, sampling parameters, the mapping of
generated tokens to records), the vllm backend's Ray Data LLM configuration, and the refusal without the extra.

The two backends' greedy outputs are compared where vLLM is importable: tests/test_vllm_backend.py (marker ``vllm``).
"""

from __future__ import annotations

import importlib.util

import pytest

from raysafe.config import ModelSpec, RaySpec
from raysafe.errors import ConfigError
from raysafe.evaluate.config import EvaluateConfig, GenerationSpec
from raysafe.evaluate.generate import Generation, Generator, prompt_ids, sampling_seed, to_generation
from raysafe.evaluate.vllm_backend import engine_kwargs, request_rows, sampling_params
from raysafe.models.tiny import tiny_tokenizer

EOS = 2  # the tiny tokenizer's </s>


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_tokens_map_to_records_as_decoded_by_hand():
    tok = tiny_tokenizer()
    # EOS ends the text; what follows (hf's padding after EOS) is ignored
    assert to_generation(tok, _ids(tok, "ab") + [EOS, 0, 0], [EOS], [], 8) == Generation("ab", 2, "eos")
    # the max number of new tokens reached without EOS or stop string
    assert to_generation(tok, _ids(tok, "abcd"), [EOS], [], 4) == Generation("abcd", 4, "length")
    # vLLM may leave EOS out of a request's tokens: fewer than max_new_tokens and no stop string is an EOS
    assert to_generation(tok, _ids(tok, "abc"), [EOS], [], 8) == Generation("abc", 3, "eos")
    # a stop string cuts the text; the tokens up to the one completing the earliest stop string are counted
    assert to_generation(tok, _ids(tok, "hi. Bye\nx"), [EOS], ["\n", ". B"], 16) == Generation("hi", 5, "stop")
    # hf: a row stopped by a stop string is padded after it (pad is special: not in the text, not counted)
    assert to_generation(tok, _ids(tok, "ok!zz") + [0, 0], [EOS], ["!"], 16) == Generation("ok", 3, "stop")
    # a stop string after EOS does not count
    assert to_generation(tok, _ids(tok, "ok") + [EOS] + _ids(tok, "!"), [EOS], ["!"], 16) == Generation("ok", 2, "eos")


@pytest.mark.parametrize("chat_template", ["on", "off"])
def test_vllm_requests_carry_the_prompt_ids_hf_generates_from(tiny_gemma_dir, chat_template):
    """Byte-identical prompts: the token ids of the vllm requests are those the hf Generator feeds ``generate``,
    through chat template or plain format, with system prompt and left truncation."""
    gen_cfg = {
        "chat_template": chat_template,
        "system_prompt": "Be brief." if chat_template == "on" else None,
        "plain_format": "Q: {prompt}\nA:",
        "max_prompt_tokens": 64,
        "max_new_tokens": 3,
    }
    spec = GenerationSpec(**gen_cfg)
    hf = Generator({"path": str(tiny_gemma_dir)}, gen_cfg, "cpu", torch_threads=1)
    texts = [
        "short",
        "a prompt long enough to be truncated on the left, keeping BOS and its last tokens, " * 2,
        "日本語",
    ]
    shards = {3: [{"text": t} for t in texts[:2]], 7: [{"text": texts[2]}]}
    rows = request_rows(hf.tok, spec, hf.chat, [EOS], shards)
    assert [(r["shard_id"], r["index"]) for r in rows] == [(3, 0), (3, 1), (7, 0)]
    assert [r["tokenized_prompt"] for r in rows] == [prompt_ids(hf.tok, t, spec, hf.chat) for t in texts]
    assert max(len(r["tokenized_prompt"]) for r in rows) == 64
    if chat_template == "on":  # the template starts with BOS; truncation keeps it
        assert rows[1]["tokenized_prompt"][0] == hf.tok.bos_token_id
    rendered = hf.tok.decode(rows[0]["tokenized_prompt"])
    want = "<|system|>Be brief.<|end|><|user|>short<|end|><|assistant|>" if chat_template == "on" else "Q: short\nA:"
    assert rendered.endswith(want)
    assert [r["sampling_params"]["seed"] for r in rows] == [
        sampling_seed(0, 3, 0),
        sampling_seed(0, 3, 1),
        7 * 1_000_003,
    ]


def test_sampling_params_and_engine_settings():
    greedy = GenerationSpec(max_new_tokens=9, stop_strings=["\nUser:"], seed=5)
    p = sampling_params(greedy, [1, 106], 42)
    assert p == {
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 42,
        "stop_token_ids": [1, 106],
        "skip_special_tokens": True,
        "stop": ["\nUser:"],
    }
    sampled = GenerationSpec(temperature=0.7, top_p=0.9)
    assert sampling_params(sampled, [1], 0) == {
        "max_tokens": 128,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 0,
        "stop_token_ids": [1],
        "skip_special_tokens": True,
    }
    gen = GenerationSpec(max_prompt_tokens=100, max_new_tokens=28, backend="vllm", vllm={"engine_kwargs": {"x": 1}})
    model = ModelSpec(path="gemma3-270m")
    kw = engine_kwargs(gen, model, RaySpec(num_gpus_per_actor=4), None)
    assert kw["tensor_parallel_size"] == 4 and kw["dtype"] == "bfloat16" and kw["max_model_len"] == 128
    assert kw["enable_prefix_caching"] is True and kw["x"] == 1 and "revision" not in kw
    cpu = engine_kwargs(gen, model, RaySpec(), "abc123")
    assert cpu["tensor_parallel_size"] == 1 and cpu["dtype"] == "float32" and cpu["revision"] == "abc123"
    pinned = gen.model_copy(update={"vllm": gen.vllm.model_copy(update={"tensor_parallel_size": 2})})
    assert engine_kwargs(pinned, model, RaySpec(num_gpus_per_actor=1), None)["tensor_parallel_size"] == 2


def test_processor_config_asks_gpus_on_gpu_actors_and_cpus_otherwise():
    pytest.importorskip("ray.data.llm")
    from raysafe.evaluate.vllm_backend import processor_config

    gen = GenerationSpec(backend="vllm", vllm={"batch_size": 32})
    model = ModelSpec(path="gemma3-270m")
    gpu = processor_config(gen, model, RaySpec(num_actors=2, num_gpus_per_actor=2), "/m", None)
    assert gpu.engine_kwargs["tensor_parallel_size"] == 2 and gpu.placement_group_config is None
    assert gpu.batch_size == 32 and gpu.concurrency == 2 and gpu.model_source == "/m"
    cpu = processor_config(gen, model, RaySpec(num_cpus_per_actor=2), "/m", None)
    (bundle,) = cpu.placement_group_config["bundles"]
    assert bundle["CPU"] == 2.0 and not bundle.get("GPU")


def test_generation_identity_per_backend():
    """hf generations keep their identity of before the backends (no backend/vllm fields); vllm's differ from
    hf's and include the engine settings, not hf's batch size."""
    hf = GenerationSpec()
    assert "backend" not in hf.identity() and "vllm" not in hf.identity() and hf.identity()["batch_size"] == 16
    v = GenerationSpec(backend="vllm")
    assert v.identity()["backend"] == "vllm" and "batch_size" not in v.identity() and "vllm" in v.identity()
    assert GenerationSpec(backend="vllm", batch_size=3).identity() == v.identity()


def test_vllm_without_the_extra_is_refused_before_any_work(tmp_path, monkeypatch):
    from raysafe.evaluate.flow import run_evaluate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cfg = EvaluateConfig.model_validate(
        {
            "models": [{"path": "gemma3-270m"}],
            "generation": {"backend": "vllm"},
            "output_dir": str(tmp_path / "eval"),
        }
    )
    with pytest.raises(ConfigError) as e:
        run_evaluate(cfg, progress=False)
    assert "pip install -e '.[vllm]'" in str(e.value) and "generation.backend" in str(e.value)
    assert not (tmp_path / "eval").exists()  # refused before the output directory is even locked


def test_transformers_stop_strings_differ_so_hf_keeps_its_own_criterion(tiny_gemma_dir):
    """transformers' ``generate(stop_strings=...)`` also matches a stop string that begins in the prompt (its
    criterion reads the whole sequence), where raysafe's criterion and vLLM read only the response: here a stop
    string made of the prompt's last character and the first generated one stops transformers after one token,
    while raysafe's hf backend (like vLLM) generates on. Hence hf keeps ``StopOnStrings``."""
    import torch

    hf = Generator({"path": str(tiny_gemma_dir)}, {"max_new_tokens": 6}, "cpu", torch_threads=1)
    found = None
    for prompt in ["How are you?", "Hello world.", "Tell me a story:", "x=1;", "abc", "Q: 2+2", "Hi!", "Name"]:
        ids = prompt_ids(hf.tok, prompt, hf.spec, hf.chat)
        free = hf.generate([prompt])[0][0]
        first = free.text[:1]
        if first.isascii() and first.isprintable() and not first.isspace() and first not in free.text[1:]:
            found = (prompt, ids, free, hf.tok.decode(ids)[-1] + first)  # the rendered prompt's last character
            break
    assert found, "no prompt gave a response starting with a printable ASCII character"
    prompt, ids, free, stop = found
    assert stop not in free.text  # the response alone does not hold the stop string
    ours = hf.generate([prompt])[0][0]
    assert ours == free
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=6, do_sample=False, stop_strings=[stop], pad_token_id=hf.tok.pad_token_id)
    out = hf.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            generation_config=gc, tokenizer=hf.tok)  # fmt: skip
    assert out.shape[1] - len(ids) == 1 < free.n_new_tokens


@pytest.mark.parametrize(
    "name, keys",
    [("evaluate_cluster.yaml", ()), ("study_cluster.yaml", ("evaluate",)), ("sweep_cluster.yaml", ("evaluate",))],
)
def test_cluster_configs_generate_with_vllm(name, keys):
    """The cluster configs of evaluate, study and sweep generate with the vllm backend (a valid GenerationSpec)."""
    from pathlib import Path

    import yaml

    tree = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "configs" / name).read_text())
    if name == "sweep_cluster.yaml":
        tree = tree["evaluation"]
    for k in keys:
        tree = tree[k]
    spec = GenerationSpec.model_validate(tree["generation"])
    assert spec.backend == "vllm" and spec.vllm.enable_prefix_caching


@pytest.mark.parametrize(
    "config, key, flow",
    [
        ("study_local.yaml", "evaluate.generation.backend", "study"),
        ("sweep_local.yaml", "evaluation.evaluate.generation.backend", "sweep"),
    ],
)
def test_study_and_sweep_refuse_vllm_without_the_extra_before_starting(tmp_path, monkeypatch, config, key, flow):
    from pathlib import Path

    from raysafe.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    path = Path(__file__).parents[1] / "jobs" / "configs" / config
    if flow == "study":
        from raysafe.study.config import StudyConfig
        from raysafe.study.flow import run_study

        cfg = load_config(StudyConfig, path, [f"{key}=vllm", f"output_dir={tmp_path / 'out'}"])
        run = run_study
    else:
        from raysafe.sweep.config import SweepConfig
        from raysafe.sweep.flow import run_sweep

        cfg = load_config(SweepConfig, path, [f"{key}=vllm", f"output_dir={tmp_path / 'out'}"])
        run = run_sweep
    with pytest.raises(ConfigError) as e:
        run(cfg, progress=False)
    assert key in str(e.value) and "pip install -e '.[vllm]'" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cpu_engines_asking_more_ram_than_is_free_are_refused(monkeypatch):
    """vLLM's CPU build reserves gpu_memory_utilization x host RAM and refuses to start without it: said first."""
    from types import SimpleNamespace

    import psutil

    from raysafe.evaluate.vllm_backend import check_cpu_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * 2**30, available=8 * 2**30))
    gen = GenerationSpec(backend="vllm")  # gpu_memory_utilization 0.9: 21.6 GiB of 24
    with pytest.raises(ConfigError) as e:
        check_cpu_memory(gen, RaySpec())
    assert "generation.vllm.gpu_memory_utilization" in str(e.value) and "at most 0.27" in str(e.value)
    check_cpu_memory(
        gen.model_copy(update={"vllm": gen.vllm.model_copy(update={"gpu_memory_utilization": 0.2})}), RaySpec()
    )
    check_cpu_memory(gen, RaySpec(num_gpus_per_actor=1))  # GPU engines: vLLM checks GPU memory itself


@pytest.mark.slow
def test_bench_generate_runs_hf_and_writes_its_figures(tmp_path, tiny_gemma_dir, ray_local, capsys):
    """`raysafe bench generate` on the evaluate code path (hf here; vllm where installed: GPU check, vllm env)."""
    import json

    from raysafe.evaluate.bench import main

    out = tmp_path / "bench.json"
    argv = ["--backend", "hf", "--model", str(tiny_gemma_dir), "--prompts", "6", "--max-new-tokens", "3"]
    assert main([*argv, "--dtype", "float32", "--shard-rows", "4", "--threads", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["backend"] == "hf" and r["generations"] == 6 and 0 < r["new_tokens"] <= 18
    assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["seconds"])
    assert "hf: 6 generations" in capsys.readouterr().out
