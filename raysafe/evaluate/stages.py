"""Shard workers of the evaluation flow, usable as Ray Data actor stages (one model load per actor).

``ModelWorkerStage`` takes rows ``{task, shard_id}``: ``generate`` reads a prompt shard, generates the responses
and writes the generation shard; ``mc`` scores a shard of multiple-choice questions by log-likelihood with the same
loaded model. ``ClassifierJudgeStage`` judges generation shards with a safety-classifier model. Both write each
output shard and then its done-marker, and return one summary row per shard, so the shard stays the unit of atomic
writes and of resume whatever block sizes Ray Data chooses. :func:`judge_shard` is the same step for judges that
run in the driver (offline patterns, an HTTP endpoint).
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysafe.evaluate.judges import Judge, JudgeInput
from raysafe.evaluate.store import EvalStore

GENERATION_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("set", pa.string()),
        ("group_id", pa.string()),
        ("lang", pa.string()),
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("n_new_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("empty", pa.bool_()),
    ]
)
JUDGEMENT_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("set", pa.string()),
        ("group_id", pa.string()),
        ("lang", pa.string()),
        ("model", pa.string()),
        ("judge", pa.string()),
        ("verdict", pa.string()),
        ("refusal", pa.bool_()),
        ("raw", pa.string()),
        ("empty", pa.bool_()),
    ]
)
UTILITY_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("group_id", pa.string()),
        ("lang", pa.string()),
        ("model", pa.string()),
        ("answer", pa.int64()),
        ("pred", pa.int64()),
        ("correct", pa.bool_()),
        ("scores", pa.list_(pa.float64())),
    ]
)


def generate_shard(gen, store: EvalStore, model_label: str, k: int) -> dict:
    """Generate responses (``hf`` backend) for prompt shard ``k`` and write generation shard ``k``; returns its
    summary."""
    inputs = pq.read_table(store.prompts.path(k)).to_pylist()
    t0 = time.perf_counter()
    outs, prompt_tokens = gen.generate([r["text"] for r in inputs], seed_offset=k)
    return write_generation_shard(store, model_label, k, inputs, outs, prompt_tokens, time.perf_counter() - t0, "hf")


def write_generation_shard(
    store: EvalStore,
    model_label: str,
    k: int,
    inputs: list[dict],
    outs: list,
    prompt_tokens: int,
    seconds: float,
    backend: str,
) -> dict:
    """Write generation shard ``k`` (one row per prompt row of ``inputs``, with its :class:`Generation`) and its
    done-marker; returns the summary. Both backends write through here, so their records and stores are the same."""
    rows = [
        {
            "row_id": r["row_id"],
            "set": r["set"],
            "group_id": r["group_id"],
            "lang": r["lang"],
            "model": model_label,
            "prompt": r["text"],
            "response": o.text,
            "n_new_tokens": o.n_new_tokens,
            "finish_reason": o.finish_reason,
            "empty": not o.text.strip(),
        }
        for r, o in zip(inputs, outs, strict=True)
    ]
    new_tokens = sum(o.n_new_tokens for o in outs)
    # ``token`` identifies this version of the shard: judgements made from another version are redone.
    summary = {
        "task": "generate",
        "shard_id": k,
        "rows": len(rows),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "n_empty": sum(r["empty"] for r in rows),
        "backend": backend,
        "token": uuid.uuid4().hex,
    }
    store.generations(model_label).write(k, pa.Table.from_pylist(rows, GENERATION_SCHEMA), summary)
    return summary


def mc_shard(model, tok, utility_spec, store: EvalStore, model_label: str, k: int) -> dict:
    """Score multiple-choice shard ``k`` and write utility shard ``k``; returns its summary."""
    from raysafe.evaluate.utility import MCQuestion, score_questions

    inputs = pq.read_table(store.mc.path(k)).to_pylist()
    qs = [MCQuestion(r["question"], tuple(r["choices"]), int(r["answer"])) for r in inputs]
    t0 = time.perf_counter()
    scores = score_questions(model, tok, qs, utility_spec)
    seconds = time.perf_counter() - t0
    rows = [
        {
            "row_id": r["row_id"],
            "group_id": r["group_id"],
            "lang": r["lang"],
            "model": model_label,
            "answer": q.answer,
            "pred": s.pred,
            "correct": s.pred == q.answer,
            "scores": list(s.scores),
        }
        for r, q, s in zip(inputs, qs, scores)
    ]
    summary = {
        "task": "mc",
        "shard_id": k,
        "rows": len(rows),
        "prompt_tokens": 0,
        "new_tokens": 0,
        "seconds": seconds,
        "n_empty": 0,
    }
    store.utility(model_label).write(k, pa.Table.from_pylist(rows, UTILITY_SCHEMA), summary)
    return summary


def judge_shard(judge: Judge, store: EvalStore, model_label: str, k: int) -> dict:
    """Judge generation shard ``k`` of a model and write judgement shard ``k``; returns its summary."""
    gen_token = (store.generations(model_label).info(k) or {}).get("token")
    gens = pq.read_table(store.generations(model_label).path(k)).to_pylist()
    inputs = {r["row_id"]: r for r in pq.read_table(store.prompts.path(k)).to_pylist()}
    items = []
    for g in gens:
        src = inputs[g["row_id"]]
        items.append(
            JudgeInput(
                g["prompt"],
                g["response"],
                g["lang"],
                bool(src["harmful"]),
                src.get("reference_safe"),
                src.get("reference_unsafe"),
            )
        )
    t0 = time.perf_counter()
    verdicts = judge.judge(items)
    seconds = time.perf_counter() - t0
    rows = [
        {
            "row_id": g["row_id"],
            "set": g["set"],
            "group_id": g["group_id"],
            "lang": g["lang"],
            "model": model_label,
            "judge": judge.label,
            "verdict": v.verdict,
            "refusal": v.refusal,
            "raw": v.raw,
            "empty": g["empty"],
        }
        for g, v in zip(gens, verdicts)
    ]
    counts = {x: sum(r["verdict"] == x for r in rows) for x in ("safe", "unsafe", "unparsed")}
    summary = {
        "task": "judge",
        "shard_id": k,
        "rows": len(rows),
        "seconds": seconds,
        "generation_token": gen_token,
        **counts,
    }
    store.judgements(model_label, judge.label).write(k, pa.Table.from_pylist(rows, JUDGEMENT_SCHEMA), summary)
    return summary


def _summaries_to_batch(summaries: list[dict]) -> dict[str, np.ndarray]:
    """The numeric progress fields of shard summaries (the full summaries are in the done-markers)."""
    out = {"task": np.asarray([str(s["task"]) for s in summaries])}
    for k in ("shard_id", "rows", "new_tokens", "n_empty"):
        out[k] = np.asarray([int(s.get(k, 0)) for s in summaries], dtype=np.int64)
    out["seconds"] = np.asarray([float(s.get("seconds", 0.0)) for s in summaries], dtype=np.float64)
    return out


class ModelWorkerStage:
    """Ray Data stage: {task, shard_id} → one summary per shard, after writing the shard's output."""

    def __init__(
        self,
        model: dict,
        generation: dict,
        utility: dict,
        store_root: str,
        model_label: str,
        torch_threads: int | None = None,
    ):
        from raysafe.evaluate.config import UtilitySpec
        from raysafe.evaluate.generate import Generator

        self.gen = Generator(model, generation, None, torch_threads)
        self.utility = UtilitySpec(**utility)
        self.store = EvalStore(store_root)
        self.label = model_label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for task, k in zip(batch["task"], batch["shard_id"]):
            if str(task) == "generate":
                out.append(generate_shard(self.gen, self.store, self.label, int(k)))
            else:
                out.append(mc_shard(self.gen.model, self.gen.tok, self.utility, self.store, self.label, int(k)))
        return _summaries_to_batch(out)


class ClassifierJudgeStage:
    """Ray Data stage: {shard_id} → one summary per judged generation shard (classifier model loaded once)."""

    def __init__(self, judge: dict, store_root: str, model_label: str, torch_threads: int | None = None):
        from raysafe.evaluate.config import JudgeSpec
        from raysafe.evaluate.judges import ClassifierJudge

        self.judge = ClassifierJudge(JudgeSpec(**judge), None, torch_threads)
        self.store = EvalStore(store_root)
        self.label = model_label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _summaries_to_batch([judge_shard(self.judge, self.store, self.label, int(k)) for k in batch["shard_id"]])
