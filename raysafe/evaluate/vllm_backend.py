"""The ``vllm`` generation backend: vLLM engines as one Ray Data stage, through Ray Data LLM (``ray.data.llm``).

The driver formats every prompt with the same :func:`~raysafe.evaluate.generate.prompt_ids` as ``hf`` and hands the
engine the token ids (``tokenized_prompt``; Ray Data LLM's own chat-template, tokenize and detokenize stages are
off), so both backends see byte-identical prompts. Each request carries the same sampling parameters (temperature,
top-p, max new tokens, stop strings, EOS ids, a seed from :func:`~raysafe.evaluate.generate.sampling_seed`); the
engines batch continuously, cache the shared prefix (the chat template) and span ``tensor_parallel_size`` GPUs. The
tokens each request generated are mapped to a :class:`~raysafe.evaluate.generate.Generation` by the same
:func:`~raysafe.evaluate.generate.to_generation` as ``hf``, and written shard by shard, as soon as a shard's last
row is back, through the same :func:`~raysafe.evaluate.stages.write_generation_shard`: a killed run keeps every
shard written and a re-run generates only the missing ones.

vLLM is an optional extra (``pip install -e '.[vllm]'``): :func:`require_vllm` refuses on the driver, before any
work, when it is not importable.
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import contextmanager

import pyarrow.parquet as pq

from raysafe.config import ModelSpec, RaySpec
from raysafe.errors import ConfigError
from raysafe.evaluate.config import GenerationSpec
from raysafe.evaluate.generate import eos_ids, prompt_ids, sampling_seed, to_generation, uses_chat_template
from raysafe.evaluate.store import EvalStore

VLLM_EXTRA = "pip install -e '.[vllm]'"


def require_vllm(where: str = "generation.backend") -> None:
    """Refuse (ConfigError naming the extra) when vLLM or Ray Data LLM cannot be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "generation.backend is 'vllm' but vLLM is not installed in this Python environment",
            where=where,
            fix=f"install the extra: {VLLM_EXTRA} (it pins its own torch and transformers; see docs/evaluation.md), "
            "or set generation.backend: hf",
        )
    try:
        import ray.data.llm  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"generation.backend is 'vllm' but Ray Data LLM cannot be imported ({e})",
            where=where,
            fix=f"install ray[data,llm]>=2.50 beside vLLM ({VLLM_EXTRA}), or set generation.backend: hf",
        ) from None


def check_cpu_memory(gen: GenerationSpec, ray_spec: RaySpec) -> None:
    """vLLM's CPU build reserves ``gpu_memory_utilization`` × host RAM for its KV cache and refuses to start when
    that much is not free: say so before the engine starts (GPU engines check their own memory)."""
    import psutil

    if ray_spec.num_gpus_per_actor > 0:
        return
    mem = psutil.virtual_memory()
    want = gen.vllm.gpu_memory_utilization * mem.total * ray_spec.num_actors
    if want > mem.available:
        fits = mem.available / mem.total / ray_spec.num_actors
        raise ConfigError(
            f"vLLM on CPU would reserve {gen.vllm.gpu_memory_utilization} x {mem.total / 2**30:.1f} GiB of host RAM "
            f"per engine x {ray_spec.num_actors} engine(s) for its KV cache, but only {mem.available / 2**30:.1f} GiB "
            "is free",
            where="generation.vllm.gpu_memory_utilization",
            fix=f"set generation.vllm.gpu_memory_utilization to at most {max(fits * 0.8, 0.01):.2f} "
            "(0.2 is enough for small models), or run on GPU actors (ray.num_gpus_per_actor)",
        )


def vllm_dtype(model: ModelSpec, ray_spec: RaySpec) -> str:
    """The engine's dtype, chosen as ``hf`` chooses it (``auto``: bfloat16 on GPU actors, float32 on CPU)."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if ray_spec.num_gpus_per_actor > 0 else "float32"


def tensor_parallel_size(gen: GenerationSpec, ray_spec: RaySpec) -> int:
    """GPUs one engine spans: ``generation.vllm.tensor_parallel_size``, else ``int(ray.num_gpus_per_actor)`` (≥ 1)."""
    return gen.vllm.tensor_parallel_size or max(1, int(ray_spec.num_gpus_per_actor))


def engine_kwargs(gen: GenerationSpec, model: ModelSpec, ray_spec: RaySpec, revision: str | None) -> dict:
    """Arguments of each vLLM engine (``vllm.AsyncEngineArgs``)."""
    v = gen.vllm
    kw = {
        "tensor_parallel_size": tensor_parallel_size(gen, ray_spec),
        "dtype": vllm_dtype(model, ray_spec),
        "max_model_len": v.max_model_len or gen.max_prompt_tokens + gen.max_new_tokens,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enforce_eager": v.enforce_eager,
        "trust_remote_code": model.trust_remote_code,
        "seed": gen.seed,
    }
    if revision:
        kw["revision"] = revision
    if v.max_num_seqs:
        kw["max_num_seqs"] = v.max_num_seqs
    return {**kw, **v.engine_kwargs}


def sampling_params(gen: GenerationSpec, eos: list[int], seed: int) -> dict:
    """``vllm.SamplingParams`` of one request: the same decoding as ``hf`` (greedy at temperature 0; top-k off)."""
    sample = gen.temperature > 0
    p = {
        "max_tokens": gen.max_new_tokens,
        "temperature": gen.temperature if sample else 0.0,
        "top_p": gen.top_p if sample else 1.0,
        "seed": seed,
        "stop_token_ids": list(eos),
        "skip_special_tokens": True,
    }
    if gen.stop_strings:
        p["stop"] = list(gen.stop_strings)
    return p


def processor_config(gen: GenerationSpec, model: ModelSpec, ray_spec: RaySpec, path: str, revision: str | None):
    """The Ray Data LLM processor config: ``ray.num_actors`` engines of ``tensor_parallel_size`` GPUs each (CPU
    actors of ``ray.num_cpus_per_actor`` CPUs when ``ray.num_gpus_per_actor`` is 0, for vLLM's CPU build)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from raysafe.runtime import actor_remote_args

    cpu_only = ray_spec.num_gpus_per_actor == 0
    return vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs=engine_kwargs(gen, model, ray_spec, revision),
        batch_size=gen.vllm.batch_size,
        concurrency=ray_spec.num_actors,
        chat_template_stage=False,  # prompts come formatted and tokenized by prompt_ids
        tokenize_stage=False,
        detokenize_stage=False,  # to_generation decodes, as for hf
        # Ray Data LLM asks one GPU per engine worker unless a placement group says otherwise
        placement_group_config={"bundles": [{"CPU": ray_spec.num_cpus_per_actor}]} if cpu_only else None,
        runtime_env=actor_remote_args(ray_spec).get("runtime_env"),
        log_engine_metrics=False,
    )


def request_rows(tok, gen: GenerationSpec, chat: bool, eos: list[int], inputs: dict[int, list[dict]]) -> list[dict]:
    """One engine request per prompt row of each shard: its place (shard, index), token ids and sampling params."""
    return [
        {
            "shard_id": k,
            "index": i,
            "tokenized_prompt": prompt_ids(tok, r["text"], gen, chat),
            "sampling_params": sampling_params(gen, eos, sampling_seed(gen.seed, k, i)),
        }
        for k, rows in inputs.items()
        for i, r in enumerate(rows)
    ]


def _keep_outputs(row: dict) -> dict:
    """Postprocess of the processor: the request's place, its prompt length and the tokens it generated."""
    return {
        "shard_id": int(row["shard_id"]),
        "index": int(row["index"]),
        "num_input_tokens": int(row["num_input_tokens"]),
        "generated_tokens": [int(t) for t in row["generated_tokens"]],
    }


def model_eos_ids(path: str, revision: str | None, tok) -> list[int]:
    """EOS ids as ``hf`` reads them from the loaded model (its generation config, then the tokenizer)."""
    from transformers import GenerationConfig

    try:
        gc = GenerationConfig.from_pretrained(path, revision=revision)
    except OSError:  # no generation_config.json: the tokenizer's EOS only (as a model without one has)
        gc = None
    return eos_ids(gc, tok)


ENGINE_RESTARTS = 2  # a vLLM engine that dies this many more times in a row is a fault of the setup, not a fluke


def bound_engine_restarts(processor) -> None:
    """Ray Data LLM restarts an engine actor whose vLLM engine died, and Ray Data's default is to restart actors
    forever: an engine that cannot run the model (an unsupported attention configuration, too little memory) then
    restarts in a loop and the run never ends. Bound it to :data:`ENGINE_RESTARTS`."""
    for stage in processor.stages.values():
        if type(stage).__name__ == "vLLMEngineStage":
            stage.map_batches_kwargs["max_restarts"] = ENGINE_RESTARTS


@contextmanager
def engine_deaths(label: str):
    """An engine actor that died past its restarts becomes a ModelError saying where the cause is logged."""
    from ray.exceptions import ActorDiedError, RayActorError

    from raysafe.errors import ModelError

    try:
        yield
    except (ActorDiedError, RayActorError) as e:
        raise ModelError(
            f"the vLLM engine for {label!r} died {ENGINE_RESTARTS + 1} times in a row ({type(e).__name__}); its own "
            "error (e.g. 'Unsupported CPU attention configuration', out of memory) is in the engine log above",
            where="generation.backend: vllm",
            fix="fix what the engine log names (generation.vllm settings, ray.num_gpus_per_actor), or generate with "
            "generation.backend: hf",
        ) from e


def generate_shards(
    gen: GenerationSpec,
    model: ModelSpec,
    ray_spec: RaySpec,
    store: EvalStore,
    label: str,
    shards: list[int],
    progress: bool = True,
) -> list[dict]:
    """Generate prompt shards ``shards`` with vLLM engines and write their generation shards; returns the summaries."""
    import ray
    from ray.data.llm import build_processor
    from tqdm.auto import tqdm

    from raysafe.errors import remote_errors
    from raysafe.evaluate.stages import write_generation_shard
    from raysafe.models.loading import load_tokenizer, resolve
    from raysafe.runtime import ensure_ray, quiet_ray_data

    require_vllm()
    if not shards:
        return []
    check_cpu_memory(gen, ray_spec)
    resolved = resolve(model)
    tok = load_tokenizer(model, resolved)
    chat = uses_chat_template(tok, gen.chat_template)
    eos = model_eos_ids(resolved.path, resolved.revision, tok)
    inputs = {k: pq.read_table(store.prompts.path(k)).to_pylist() for k in shards}
    requests = request_rows(tok, gen, chat, eos, inputs)
    ensure_ray(ray_spec)
    quiet_ray_data()
    processor = build_processor(
        processor_config(gen, model, ray_spec, resolved.path, resolved.revision), postprocess=_keep_outputs
    )
    bound_engine_restarts(processor)
    ds = processor(ray.data.from_items(requests))
    got: dict[int, dict[int, dict]] = {k: {} for k in shards}
    summaries = []
    t0 = time.perf_counter()
    with (
        engine_deaths(label),
        remote_errors(),
        tqdm(total=len(shards), desc=f"generate {label} (vllm)", unit="shard", disable=not progress) as bar,
    ):
        for row in ds.iter_rows():
            k = int(row["shard_id"])
            got[k][int(row["index"])] = row
            if len(got[k]) == len(inputs[k]):
                outs = [got[k][i] for i in range(len(inputs[k]))]
                gens = [
                    to_generation(tok, o["generated_tokens"], eos, gen.stop_strings, gen.max_new_tokens) for o in outs
                ]
                prompt_tokens = sum(int(o["num_input_tokens"]) for o in outs)
                # seconds: from the start of the stage to this shard's last row (the engines interleave shards)
                summaries.append(
                    write_generation_shard(
                        store, label, k, inputs[k], gens, prompt_tokens, time.perf_counter() - t0, "vllm"
                    )
                )
                del got[k]
                bar.update(1)
    return summaries
