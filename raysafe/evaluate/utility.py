"""Multiple-choice accuracy by log-likelihood (MMLU-style), the utility side of the evaluation.

For each question the context is ``prompt_format`` filled with the question and its four options; each option's
continuation is scored by the sum of its token log-probabilities given the context:

- ``letter`` scoring: continuations " A", " B", " C", " D" (the MMLU convention); prediction = argmax.
- ``option`` scoring: continuation " " + the option's text, scored by the *mean* log-prob per token (so long
  options are not penalised for their length); prediction = argmax.

Context and continuation are tokenised separately and concatenated (as lm-evaluation-harness does), left-padded,
with positions counting real tokens only, so a padded batch scores exactly like one unpadded sequence. When every
continuation is a single token (letters with most tokenizers) one forward of the context per question suffices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysafe.evaluate.config import UtilitySpec
from raysafe.models.batching import pad_batch, plan_batches
from raysafe.models.layers import position_ids_from_mask

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MCQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


@dataclass(frozen=True)
class MCScore:
    scores: tuple[float, ...]  # one per option (sum or mean log-prob)
    pred: int


def mc_context(q: MCQuestion, fmt: str) -> str:
    fields = {"question": q.question, **dict(zip(LETTERS, q.choices))}
    out = fmt
    for k, v in fields.items():
        out = out.replace("{" + k + "}", v)
    return out


def mc_continuations(q: MCQuestion, scoring: str) -> list[str]:
    return [f" {x}" for x in LETTERS] if scoring == "letter" else [f" {c}" for c in q.choices]


@torch.inference_mode()
def continuation_logprobs(
    model, ctx_ids: list[list[int]], cont_ids: list[list[int]], pad_id: int, batch_size: int = 16
) -> list[list[float]]:
    """Per-token log-probs of each continuation given its context (one list per (context, continuation) pair)."""
    device = next(model.parameters()).device
    seqs = [c + x for c, x in zip(ctx_ids, cont_ids)]
    out: list[list[float] | None] = [None] * len(seqs)
    plan = plan_batches([len(s) for s in seqs], max_tokens=10**12, max_rows=batch_size)
    for rows in plan:
        ids, mask = pad_batch([seqs[i] for i in rows], pad_id, "left")
        k = max(len(cont_ids[i]) for i in rows)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids_from_mask(mask).to(device),
            logits_to_keep=k + 1,
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # [b, k+1, V]: predictions for the last k+1 positions
        T = ids.shape[1]
        for j, i in enumerate(rows):
            n = len(cont_ids[i])
            # token at absolute position p is predicted by logits at p-1; kept logits start at T-(k+1)
            vals = []
            for t, tok_id in enumerate(cont_ids[i]):
                p = T - n + t
                vals.append(float(logp[j, p - 1 - (T - (k + 1)), tok_id]))
            out[i] = vals
    return out  # type: ignore[return-value]


@torch.inference_mode()
def next_token_logprobs(
    model, ctx_ids: list[list[int]], token_ids: list[list[int]], pad_id: int, batch_size: int = 16
) -> list[list[float]]:
    """Log-probs of the given single next tokens after each context (one forward per context)."""
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(ctx_ids)
    plan = plan_batches([len(s) for s in ctx_ids], max_tokens=10**12, max_rows=batch_size)
    for rows in plan:
        ids, mask = pad_batch([ctx_ids[i] for i in rows], pad_id, "left")
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids_from_mask(mask).to(device),
            logits_to_keep=1,
        ).logits
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        for j, i in enumerate(rows):
            out[i] = [float(logp[j, t]) for t in token_ids[i]]
    return out  # type: ignore[return-value]


def score_questions(model, tok, questions: list[MCQuestion], spec: UtilitySpec) -> list[MCScore]:
    """Log-likelihood scores and predictions for each question."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ctx, conts = [], []
    for q in questions:
        c = list(tok(mc_context(q, spec.prompt_format), add_special_tokens=True)["input_ids"])
        if len(c) > spec.max_length:
            bos = tok.bos_token_id
            c = ([bos] + c[-(spec.max_length - 1) :]) if (bos is not None and c[0] == bos) else c[-spec.max_length :]
        ctx.append(c)
        conts.append([list(tok(x, add_special_tokens=False)["input_ids"]) for x in mc_continuations(q, spec.scoring)])
    if all(len(x) == 1 for cs in conts for x in cs):
        lps = next_token_logprobs(model, ctx, [[x[0] for x in cs] for cs in conts], pad, spec.batch_size)
        scores = [tuple(v) for v in lps]
    else:
        flat_ctx = [c for c, cs in zip(ctx, conts) for _ in cs]
        flat_cont = [x for cs in conts for x in cs]
        lps = continuation_logprobs(model, flat_ctx, flat_cont, pad, spec.batch_size)
        agg = (lambda v: sum(v)) if spec.scoring == "letter" else (lambda v: sum(v) / len(v))
        scores, k = [], 0
        for cs in conts:
            scores.append(tuple(agg(lps[k + m]) if lps[k + m] else float("-inf") for m in range(len(cs))))
            k += len(cs)
    return [MCScore(s, int(max(range(len(s)), key=lambda m: s[m]))) for s in scores]
