"""Generation shared by both backends, and the Hugging Face (``hf``) backend.

Shared, so that ``hf`` and ``vllm`` (:mod:`raysafe.evaluate.vllm_backend`) see byte-identical prompts and report
identical records: prompt formatting (chat template or plain format, left truncation: :func:`prompt_ids`), the EOS
ids (:func:`eos_ids`), sampling seeds (:func:`sampling_seed`) and the mapping of a row's new tokens to one
:class:`Generation` (text cut at the first stop string, new tokens, finish reason: :func:`to_generation`).

The ``hf`` backend: length-sorted left-padded ``generate`` batches (:func:`generate_ids`), used by the generation
actor (``raysafe.evaluate.stages``), the classifier judge and the LLM translator. Greedy unless a temperature is
given; sampling is seeded per shard and batch so that a re-run of a shard reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysafe.errors import ConfigError
from raysafe.evaluate.config import GenerationSpec
from raysafe.models.batching import pad_batch, plan_batches


@dataclass(frozen=True)
class Generation:
    text: str
    n_new_tokens: int  # tokens generated before EOS (EOS and padding excluded; a stop string's tokens included)
    finish_reason: str  # eos | stop | length


def uses_chat_template(tok, mode: str) -> bool:
    has = bool(getattr(tok, "chat_template", None))
    if mode == "on" and not has:
        raise ConfigError(
            "generation.chat_template is 'on' but the tokenizer has no chat template",
            where="generation.chat_template",
            fix="use 'auto' (plain prompts for base models such as gemma3-270m) or an instruct model",
        )
    return has if mode == "auto" else mode == "on"


def prompt_ids(tok, text: str, spec: GenerationSpec, chat: bool) -> list[int]:
    """Token ids of one prompt as the model sees it, left-truncated to ``spec.max_prompt_tokens`` (BOS kept)."""
    if chat:
        msgs = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
        msgs.append({"role": "user", "content": text})
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tok(spec.plain_format.replace("{prompt}", text), add_special_tokens=True)["input_ids"])
    limit = spec.max_prompt_tokens
    if len(ids) > limit:
        bos = tok.bos_token_id
        ids = ([bos] + ids[-(limit - 1) :]) if (bos is not None and ids[0] == bos) else ids[-limit:]
    return ids


def eos_ids(generation_config, tok) -> list[int]:
    """Token ids that end a response: the model's generation config's ``eos_token_id`` (one or a list; Gemma 3
    also ends a turn with ``<end_of_turn>``) and the tokenizer's."""
    ids: set[int] = set()
    for src in (generation_config, tok):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(int(x) for x in v)
    return sorted(ids)


def sampling_seed(seed: int, shard: int, part: int) -> int:
    """The seed of one sampling draw: ``seed`` of the config, the output shard, and the part within the shard
    (``hf``: the generate batch; ``vllm``: the prompt, as vLLM seeds each request). Irrelevant when greedy."""
    return (seed + shard) * 1_000_003 + part


def cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _tokens_to_stop(tok, toks: list[int], stop_strings: list[str]) -> int:
    """The fewest leading tokens of ``toks`` whose decoded text holds a stop string (the whole text holds one):
    where a generation stopped by that string ended (binary search; decoding is monotone in the prefix)."""
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if cut_at_stop(tok.decode(toks[:mid], skip_special_tokens=True), stop_strings)[1]:
            hi = mid
        else:
            lo = mid + 1
    return hi


def to_generation(tok, new_tokens: list[int], eos: list[int], stop_strings: list[str], max_new_tokens: int):
    """One :class:`Generation` from the tokens a backend generated after the prompt (``hf``: a row of the padded
    batch, padding after EOS included; ``vllm``: the request's token ids). The text is the decoded tokens before the
    first EOS, cut at the first stop string; ``n_new_tokens`` counts the tokens up to the EOS (excluded) or up to
    the token that completed the stop string (included). finish_reason: ``stop`` (a stop string), ``eos``, or
    ``length`` (``max_new_tokens`` reached)."""
    end = next((k for k, t in enumerate(new_tokens) if t in eos), None)
    toks = list(new_tokens[:end]) if end is not None else list(new_tokens)
    text, found = cut_at_stop(tok.decode(toks, skip_special_tokens=True), stop_strings)
    if found:
        return Generation(text, _tokens_to_stop(tok, toks, stop_strings), "stop")
    # vLLM may leave the EOS out of a request's tokens: fewer than max_new_tokens without a stop string is an EOS
    reason = "eos" if end is not None or len(toks) < max_new_tokens else "length"
    return Generation(text, len(toks), reason)


class StopOnStrings:
    """Stopping criterion: a row is done once its decoded new text contains a stop string; records the length."""

    def __init__(self, tok, stop_strings: list[str], prompt_len: int):
        self.tok = tok
        self.stops = stop_strings
        self.prompt_len = prompt_len
        self.stopped_at: dict[int, int] = {}  # row -> number of new tokens when its stop string appeared

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        for r in range(input_ids.shape[0]):
            if r in self.stopped_at:
                done[r] = True
                continue
            text = self.tok.decode(input_ids[r, self.prompt_len :], skip_special_tokens=True)
            if any(s in text for s in self.stops):
                self.stopped_at[r] = n_new
                done[r] = True
        return done


@torch.inference_mode()
def generate_ids(
    model,
    tok,
    ids: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_strings: list[str] | None = None,
    seed: int = 0,
) -> list[Generation]:
    """One :class:`Generation` per token list, in input order (batches are length-sorted internally)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    eos = eos_ids(getattr(model, "generation_config", None), tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    stops = list(stop_strings or [])
    out: list[Generation | None] = [None] * len(ids)
    plan = plan_batches([len(x) for x in ids], max_tokens=10**12, max_rows=batch_size)
    for b, rows in enumerate(plan):
        input_ids, mask = pad_batch([ids[i] for i in rows], pad, "left")
        prompt_len = input_ids.shape[1]
        gc = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=None,
            eos_token_id=eos or None,
            pad_token_id=pad,
        )
        crit = StopOnStrings(tok, stops, prompt_len) if stops else None
        if temperature > 0:
            torch.manual_seed(sampling_seed(seed, 0, b))
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=gc,
            stopping_criteria=StoppingCriteriaList([crit]) if crit else None,
        )
        new = gen[:, prompt_len:].cpu().tolist()
        for j, i in enumerate(rows):
            out[i] = to_generation(tok, new[j], eos, stops, max_new_tokens)
    return out  # type: ignore[return-value]


class Generator:
    """A model and tokenizer loaded once; formats prompts and generates responses per :class:`GenerationSpec`."""

    def __init__(self, model: dict, generation: dict, device: str | None = None, torch_threads: int | None = None):
        from raysafe.config import ModelSpec
        from raysafe.models.loading import load_model, resolve

        if torch_threads:
            torch.set_num_threads(torch_threads)
        spec = ModelSpec(**model)
        self.spec = GenerationSpec(**generation)
        self.model, self.tok = load_model(spec, device, resolve(spec))
        self.chat = uses_chat_template(self.tok, self.spec.chat_template)

    def generate(self, prompts: list[str], seed_offset: int = 0) -> tuple[list[Generation], int]:
        """(generations, prompt tokens) for prompt texts."""
        ids = [prompt_ids(self.tok, p, self.spec, self.chat) for p in prompts]
        s = self.spec
        gens = generate_ids(
            self.model,
            self.tok,
            ids,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            temperature=s.temperature,
            top_p=s.top_p,
            stop_strings=s.stop_strings,
            seed=s.seed + seed_offset,
        )
        return gens, sum(map(len, ids))
