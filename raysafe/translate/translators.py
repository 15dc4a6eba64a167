"""Translators: texts in one language → texts in another, one :class:`Translation` per text, in input order.

- :class:`Seq2SeqTranslator` — Hugging Face encoder-decoder MT models (NLLB-200, M2M100, Marian), one model per
  direction or one for all; language codes from ``raysafe.translate.codes`` checked against the tokenizer before any
  work starts (:func:`check_directions`).
- :class:`LLMTranslator` — an instruction-tuned causal LM through the evaluation's generation backend (``hf``).
- ``OpenAITranslator`` (``raysafe.translate.endpoint``) — an OpenAI-compatible endpoint.

``make_translator(spec)`` builds the one a spec names; ``translator_identity(spec, directions)`` is the record of
what translates (weights fingerprints, codes, decoding settings) that the output directory's identity includes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from raysafe.config import ModelSpec
from raysafe.errors import ConfigError, DataError, ModelError
from raysafe.models.batching import pad_batch, plan_batches
from raysafe.translate.codes import language_name, model_code_candidates
from raysafe.translate.config import TranslatorSpec


@dataclass(frozen=True)
class Translation:
    text: str
    n_tokens: int | None = None  # content tokens of the output (None: not measured, e.g. an endpoint)
    n_unk: int | None = None  # of which the tokenizer's unknown token


class InputTooLong(DataError):
    """An input text is longer than ``translator.max_input_tokens``; ``index`` is its position in the call."""

    def __init__(self, index: int, n_tokens: int, limit: int):
        self.index = index
        super().__init__(
            f"a text has {n_tokens} tokens, over translator.max_input_tokens={limit}",
            where=f"text {index} of the batch",
            fix="raise translator.max_input_tokens (within the model's limit) or split the text",
        )


def direction_model(spec: TranslatorSpec, src: str, tgt: str) -> ModelSpec:
    """The model that translates ``src`` → ``tgt``: ``directions["src-tgt"]``, else ``model``."""
    m = spec.directions.get(f"{src}-{tgt}") or spec.model
    if m is None:
        raise ConfigError(
            f"no model translates {src} -> {tgt}",
            where="translator.directions",
            fix=f'add "{src}-{tgt}" to translator.directions, or set translator.model (a multilingual model)',
        )
    return m


# ------------------------------------------------------------------------------------------------ seq2seq
@dataclass
class LoadedMT:
    model: object
    tok: object
    family: str


def detect_family(tok, model_type: str, wanted: str) -> str:
    """nllb | m2m100 | marian: ``wanted`` unless 'auto', else from the tokenizer's language tokens."""
    if wanted != "auto":
        return wanted
    vocab = tok.get_vocab()
    if "eng_Latn" in vocab:
        return "nllb"
    if "__en__" in vocab:
        return "m2m100"
    if model_type == "marian":
        return "marian"
    raise ConfigError(
        f"cannot tell how this {model_type} model writes language codes (its vocabulary has neither NLLB codes "
        "like eng_Latn nor M2M100 codes like __en__)",
        where="translator.family",
        fix="set translator.family to nllb, m2m100 or marian",
    )


def token_id(tok, candidates: list[str]) -> tuple[int | None, str | None]:
    """The first candidate token that is in the vocabulary (not the unknown token)."""
    vocab = tok.get_vocab()
    for c in candidates:
        if c in vocab:
            return vocab[c], c
    return None, None


def is_multi_target(tok) -> bool:
    """A Marian model that takes a ``>>xxx<<`` target-language token."""
    return any(t.startswith(">>") and t.endswith("<<") for t in tok.get_vocab())


def language_ids(
    loaded: LoadedMT, src: str, tgt: str, spec: TranslatorSpec, model_label: str
) -> tuple[int | None, int | None]:
    """(source code id, target code id) for one direction; raises ConfigError naming the language when the model
    has no token for it (it would translate into some other language)."""
    tok, family = loaded.tok, loaded.family
    need_src = family in ("nllb", "m2m100")
    need_tgt = family in ("nllb", "m2m100") or is_multi_target(tok)
    ids = []
    for code, needed in ((src, need_src), (tgt, need_tgt)):
        if not needed:
            ids.append(None)
            continue
        cands = model_code_candidates(code, family, spec.lang_codes)
        i, _ = token_id(tok, cands)
        if i is None:
            raise ConfigError(
                f"model {model_label!r} ({family}) has no language token for {code!r} (tried "
                f"{cands or 'none: the code table has no entry'})",
                where=f"translate.target_langs / translator.lang_codes, language {code}",
                fix=f"map it with translator.lang_codes: {{{code}: <the model's code>}}, or drop {code!r}",
            )
        ids.append(i)
    return ids[0], ids[1]


class Seq2SeqTranslator:
    """Encoder-decoder MT: inputs ``[src code] text </s>`` (NLLB, M2M100) or ``[>>tgt<<] text </s>`` (Marian), the
    target code forced as the first generated token (NLLB, M2M100); greedy or beam search, length-sorted batches."""

    def __init__(self, spec: TranslatorSpec, device: str | None = None, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = spec
        self.label = spec.label
        self.device = device
        self._loaded: dict[tuple[str, str | None], LoadedMT] = {}

    def load(self, mspec: ModelSpec, with_model: bool = True) -> LoadedMT:
        from raysafe.models.loading import (
            gpu_placement,
            load_tokenizer,
            pick_device,
            pick_dtype,
            placed_for_inference,
            resolve,
        )

        key = (mspec.path, mspec.revision)
        have = self._loaded.get(key)
        if have is not None and (have.model is not None or not with_model):
            return have
        resolved = resolve(mspec)
        tok = have.tok if have else load_tokenizer(mspec, resolved)
        model = None
        model_type = ""
        if with_model:
            from transformers import AutoModelForSeq2SeqLM

            dev = pick_device(self.device)
            dtype = pick_dtype(mspec, dev)
            placement = gpu_placement(mspec, resolved, dev, dtype)  # all of the actor's GPUs
            try:
                model = AutoModelForSeq2SeqLM.from_pretrained(
                    resolved.path,
                    revision=resolved.revision,
                    dtype=dtype,
                    trust_remote_code=mspec.trust_remote_code,
                    **placement,
                )
            except (OSError, ValueError) as e:
                raise ModelError(
                    f"cannot load MT model {mspec.label!r} from {resolved.path!r}: {str(e).splitlines()[0]}",
                    where=f"translator model {mspec.label}: path",
                    fix="give a local directory of a seq2seq model (NLLB, M2M100, Marian) or, with network, a hub id",
                ) from None
            model = placed_for_inference(mspec, model, dev, placement)
            model_type = model.config.model_type
        else:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(resolved.path, revision=resolved.revision).model_type
        loaded = LoadedMT(model, tok, detect_family(tok, model_type, self.spec.family))
        self._loaded[key] = loaded
        return loaded

    def check(self, src: str, tgt: str) -> None:
        """Raise ConfigError before any work when the direction's model has no code for a language."""
        mspec = direction_model(self.spec, src, tgt)
        language_ids(self.load(mspec, with_model=False), src, tgt, self.spec, mspec.label)

    @torch.inference_mode()
    def translate(self, texts: list[str], src: str, tgt: str) -> list[Translation]:
        mspec = direction_model(self.spec, src, tgt)
        loaded = self.load(mspec)
        src_id, tgt_id = language_ids(loaded, src, tgt, self.spec, mspec.label)
        tok, model = loaded.tok, loaded.model
        eos = tok.eos_token_id
        ids = []
        for i, t in enumerate(texts):
            body = list(tok(t, add_special_tokens=False)["input_ids"])
            if len(body) + 2 > self.spec.max_input_tokens:
                raise InputTooLong(i, len(body) + 2, self.spec.max_input_tokens)
            head = [src_id] if loaded.family in ("nllb", "m2m100") else ([tgt_id] if tgt_id is not None else [])
            ids.append(head + body + [eos])
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        special = set(tok.all_special_ids) - {tok.unk_token_id}
        unk = tok.unk_token_id
        dev = next(model.parameters()).device
        out: list[Translation | None] = [None] * len(texts)
        for rows in plan_batches([len(x) for x in ids], max_tokens=10**12, max_rows=self.spec.batch_size):
            input_ids, mask = pad_batch([ids[i] for i in rows], pad, "right")
            kwargs = {"forced_bos_token_id": tgt_id} if loaded.family in ("nllb", "m2m100") else {}
            gen = model.generate(
                input_ids=input_ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=self.spec.max_new_tokens,
                num_beams=self.spec.num_beams,
                do_sample=False,
                **kwargs,
            )
            for j, i in enumerate(rows):
                toks = gen[j, 1:].tolist()  # after the decoder start token
                end = next((k for k, x in enumerate(toks) if x == eos), len(toks))
                content = [x for x in toks[:end] if x not in special and x != pad]
                n_unk = sum(1 for x in content if x == unk) if unk is not None else 0
                out[i] = Translation(tok.decode(content, skip_special_tokens=True).strip(), len(content), n_unk)
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- llm
def llm_request(spec: TranslatorSpec, text: str, src: str, tgt: str) -> str:
    """The translation request an LLM (or an endpoint) gets for one text."""
    return (
        spec.prompt_format.replace("{source_name}", language_name(src))
        .replace("{target_name}", language_name(tgt))
        .replace("{text}", text)
    )


class LLMTranslator:
    """An instruction-tuned causal LM prompted with ``prompt_format``, through the evaluation's ``Generator``."""

    def __init__(self, spec: TranslatorSpec, device: str | None = None, torch_threads: int | None = None):
        if spec.backend != "hf":
            raise ConfigError(
                "the vLLM backend is not available for translation yet (issue 23)",
                where="translator.backend",
                fix="use translator.backend: hf",
            )
        from raysafe.evaluate.config import GenerationSpec
        from raysafe.evaluate.flow import Generator

        self.spec = spec
        self.label = spec.label
        gen = GenerationSpec(
            max_new_tokens=spec.max_new_tokens,
            chat_template=spec.chat_template,
            batch_size=spec.batch_size,
            max_prompt_tokens=spec.max_input_tokens + 512,
            stop_strings=spec.stop_strings,
        )
        self.gen = Generator(spec.model.model_dump(), gen.model_dump(), device, torch_threads)

    def check(self, src: str, tgt: str) -> None:
        """An LLM takes any language name; nothing to check before the run."""

    def translate(self, texts: list[str], src: str, tgt: str) -> list[Translation]:
        tok = self.gen.tok
        for i, t in enumerate(texts):
            n = len(tok(t, add_special_tokens=False)["input_ids"])
            if n > self.spec.max_input_tokens:
                raise InputTooLong(i, n, self.spec.max_input_tokens)
        gens, _ = self.gen.generate([llm_request(self.spec, t, src, tgt) for t in texts])
        unk = tok.unk_token_id
        out = []
        for g in gens:
            ids = tok(g.text, add_special_tokens=False)["input_ids"]
            out.append(Translation(g.text.strip(), len(ids), sum(1 for x in ids if x == unk) if unk is not None else 0))
        return out


# ------------------------------------------------------------------------------------------------- choose
def make_translator(spec: TranslatorSpec, device: str | None = None, torch_threads: int | None = None):
    if spec.kind == "seq2seq":
        return Seq2SeqTranslator(spec, device, torch_threads)
    if spec.kind == "llm":
        return LLMTranslator(spec, device, torch_threads)
    from raysafe.translate.endpoint import OpenAITranslator

    return OpenAITranslator(spec)


@functools.cache
def _fingerprint(path: str, revision: str | None) -> str:
    """The weights' identity: ``resolve``'s fingerprint (hub id@revision, or a hash of a local config.json), and for
    a local directory also the size and first 16 MiB of every weight file, so that two checkpoints with one config
    (a fine-tuned MT model, two random test models) are told apart."""
    import hashlib
    from pathlib import Path

    from raysafe.models.loading import resolve

    resolved = resolve(ModelSpec(path=path, revision=revision))
    if resolved.source != "local":
        return resolved.fingerprint
    h = hashlib.sha256(resolved.fingerprint.encode())
    for f in sorted(Path(resolved.path).glob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            h.update(f.name.encode() + str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 24))
    return h.hexdigest()[:16]


def translator_identity(spec: TranslatorSpec, directions: list[tuple[str, str]]) -> dict:
    """What produces the translations: kind, the weights of every model used (fingerprints), codes and decoding
    settings. Throughput knobs (batch size, actors, concurrency) are left out: they do not change the texts."""
    ident: dict = {
        "kind": spec.kind,
        "family": spec.family,
        "lang_codes": dict(sorted(spec.lang_codes.items())),
        "max_new_tokens": spec.max_new_tokens,
        "max_input_tokens": spec.max_input_tokens,
    }
    if spec.kind == "seq2seq":
        for s, t in directions:
            direction_model(spec, s, t)  # every direction the run needs has a model, or a ConfigError now
        ident["num_beams"] = spec.num_beams
        # The configured models, not the directions in use: adding a target language to a run with one multilingual
        # model keeps the identity; per-direction models (and so any direction added) are part of it.
        ident["models"] = {k: _fingerprint(m.path, m.revision) for k, m in sorted(spec.directions.items())}
        if spec.model is not None:
            ident["models"]["*"] = _fingerprint(spec.model.path, spec.model.revision)
    elif spec.kind == "llm":
        ident.update(
            prompt_format=spec.prompt_format,
            chat_template=spec.chat_template,
            stop_strings=spec.stop_strings,
            backend=spec.backend,
            model=_fingerprint(spec.model.path, spec.model.revision),
        )
    else:
        from raysafe.translate.endpoint import endpoint_base

        ident.update(prompt_format=spec.prompt_format, endpoint_model=spec.endpoint_model, url=endpoint_base(spec))
    return ident
