"""Collation of preference pairs and their prompt variants into one padded batch for a single forward pass.

A batch of B samples with m variants each becomes ``N = 2B + B·m`` rows::

    rows 0 .. B-1          prompt + chosen     labels: -100 on prompt and padding, answer token ids elsewhere
    rows B .. 2B-1         prompt + rejected   (same)
    rows 2B + b·m + j      variant j of item b (prompt only, language langs[b][j]); labels all -100

``variant_last_index[b·m + j]`` is the column of the last prompt token of that variant row (with a chat template:
the last token of the generation prompt), i.e. the position whose hidden state the MLC loss reads.
See docs/losses.md for the truncation policy and the errors raised on bad input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from raysafe.errors import ConfigError, DataError
from raysafe.models.layers import position_ids_from_mask

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("group_id", "prompt", "chosen", "rejected", "variants")


@dataclass
class EncodedSample:
    """Token ids of one sample after truncation."""

    group_id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    langs: list[str]
    variants: list[list[int]]


def _text(value: Any, group_id: str, field: str) -> str:
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar strings from Arrow batches
        value = value.item()
    if not isinstance(value, str):
        raise DataError(
            f"field {field!r} must be a string, got {type(value).__name__}",
            where=f"group_id={group_id}, field={field}",
        )
    if not value.strip():
        raise DataError(
            f"field {field!r} is empty",
            where=f"group_id={group_id}, field={field}",
            fix="drop the row or fill the text; an empty answer gives a loss stuck at ln 2",
        )
    return value


def _variant(entry: Any, group_id: str, index: int) -> tuple[str, str]:
    """One variant as ``(lang, text)`` from a ``(lang, text)`` pair or a ``{lang, text[, group_id]}`` mapping."""
    where = f"group_id={group_id}, field=variants[{index}]"
    if isinstance(entry, Mapping):
        if "lang" not in entry or "text" not in entry:
            raise DataError("a variant mapping needs keys 'lang' and 'text'", where=where)
        other = entry.get("group_id")
        if other is not None and str(other) != group_id:
            raise DataError(
                f"variant belongs to group {other!r}, not to the sample's group",
                where=f"{where}, lang={entry['lang']}",
                fix="join variants to pairs by group_id",
            )
        lang, text = entry["lang"], entry["text"]
    elif not isinstance(entry, (str, bytes)) and hasattr(entry, "__len__") and hasattr(entry, "__getitem__"):
        if len(entry) != 2:
            raise DataError(f"a variant must be (lang, text), got {len(entry)} items", where=where)
        lang, text = entry[0], entry[1]
    else:
        raise DataError(f"a variant must be (lang, text) or a mapping, got {type(entry).__name__}", where=where)
    lang = _text(lang, group_id, f"variants[{index}].lang")
    return lang, _text(text, group_id, f"variants[{index}].text (lang={lang})")


def _rows(samples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[Mapping[str, Any]]:
    """A list of sample mappings from either a list of samples or a dict of columns (Ray Data batches)."""
    if isinstance(samples, Mapping):
        missing = [f for f in REQUIRED_FIELDS if f not in samples]
        if missing:
            raise DataError(f"batch lacks column(s) {missing}", where="preference batch", fix=f"need {REQUIRED_FIELDS}")
        n = len(samples["group_id"])
        return [{k: samples[k][i] for k in REQUIRED_FIELDS} for i in range(n)]
    return list(samples)


class PreferenceCollator:
    """Tokenise, truncate, validate and pad preference pairs with their prompt variants (see module docstring).

    ``use_chat_template``: ``"auto"`` uses the tokenizer's chat template when it has one. ``padding_side``: ``None``
    takes the tokenizer's. ``max_prompt_length=None`` disables prompt truncation. ``on_overflow``: ``"error"``
    raises :class:`DataError` for a sample whose prompt (or a variant) leaves no room within ``max_length``;
    ``"skip"`` drops it and counts it in :attr:`skipped` (cumulative) and ``batch["n_skipped"]``.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 1024,
        max_prompt_length: int | None = 512,
        use_chat_template: bool | Literal["auto"] = "auto",
        padding_side: Literal["left", "right"] | None = None,
        on_overflow: Literal["error", "skip"] = "error",
        pad_to_multiple_of: int | None = None,
        add_eos: bool = True,
        prompt_truncation: Literal["head", "tail"] = "head",
    ):
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}", where="collate.max_length")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ConfigError(
                f"max_prompt_length must be >= 1 or None, got {max_prompt_length}", where="collate.max_prompt_length"
            )
        if prompt_truncation not in ("head", "tail"):
            raise ConfigError(
                f"prompt_truncation must be 'head' or 'tail', got {prompt_truncation!r}",
                where="collate.prompt_truncation",
            )
        if on_overflow not in ("error", "skip"):
            raise ConfigError(
                f"on_overflow must be 'error' or 'skip', got {on_overflow!r}", where="collate.on_overflow"
            )
        side = padding_side or tokenizer.padding_side
        if side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}", where="collate.padding_side")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template == "auto":
            use_chat_template = has_template
        elif use_chat_template and not has_template:
            raise ConfigError(
                "use_chat_template=True but the tokenizer has no chat template",
                where="collate.use_chat_template",
                fix="set use_chat_template to 'auto' or False, or load a tokenizer with a template",
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token", where="tokenizer")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.use_chat_template = bool(use_chat_template)
        self.padding_side = side
        self.on_overflow = on_overflow
        self.pad_to_multiple_of = pad_to_multiple_of
        self.add_eos = add_eos
        self.prompt_truncation = prompt_truncation
        self.pad_id = int(pad_id)
        self.skipped = 0

    # --------------------------------------------------------------------------------------------- tokenisation
    def prompt_text(self, text: str) -> str:
        """The prompt as the model sees it: the chat template with a generation prompt, or the text itself."""
        if not self.use_chat_template:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt token ids cut to ``max_prompt_length``: its first tokens (``prompt_truncation="head"``, as the MLC
        release's LLaMA-Factory ``prompt_ids[:source_len]``), or a leading BOS token if there is one and its last
        tokens (``"tail"``, which keeps the generation prompt the MLC term reads)."""
        if self.use_chat_template:
            ids = list(self.tokenizer(self.prompt_text(text), add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit and self.prompt_truncation == "head":
            ids = ids[:limit]
        elif limit is not None and len(ids) > limit:
            bos = self.tokenizer.bos_token_id
            if bos is not None and ids[0] == bos and limit > 1:
                ids = [bos] + ids[len(ids) - (limit - 1) :]
            else:
                ids = ids[len(ids) - limit :]
        return ids

    def encode_answer(self, text: str) -> list[int]:
        """Answer token ids (no special tokens), followed by EOS when ``add_eos``."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is not None:
            ids.append(int(eos))
        return ids

    # ------------------------------------------------------------------------------------------------ samples
    def validate(self, sample: Mapping[str, Any]) -> tuple[str, str, str, str, list[tuple[str, str]]]:
        """Check one sample's fields; return ``(group_id, prompt, chosen, rejected, variants)`` or raise DataError."""
        if not isinstance(sample, Mapping):
            raise DataError(f"a sample must be a mapping, got {type(sample).__name__}", where="preference batch")
        gid = sample.get("group_id")
        group_id = str(gid.item() if hasattr(gid, "item") else gid) if gid is not None else "<missing>"
        missing = [f for f in REQUIRED_FIELDS if f not in sample or sample[f] is None]
        if missing:
            raise DataError(
                f"sample lacks field(s) {missing}", where=f"group_id={group_id}", fix=f"need {REQUIRED_FIELDS}"
            )
        prompt = _text(sample["prompt"], group_id, "prompt")
        chosen = _text(sample["chosen"], group_id, "chosen")
        rejected = _text(sample["rejected"], group_id, "rejected")
        raw = sample["variants"]
        if isinstance(raw, (str, Mapping)) or not hasattr(raw, "__len__"):
            raise DataError(
                "field 'variants' must be a list of (lang, text)", where=f"group_id={group_id}, field=variants"
            )
        variants = [_variant(v, group_id, i) for i, v in enumerate(raw)]
        if len(variants) < 2:
            raise DataError(
                f"the MLC loss needs at least 2 prompt variants per item, got {len(variants)}",
                where=f"group_id={group_id}, field=variants",
                fix="add translations of the prompt or drop the item",
            )
        langs = [lang for lang, _ in variants]
        dupes = sorted({lang for lang in langs if langs.count(lang) > 1})
        if dupes:
            raise DataError(f"duplicate variant language(s) {dupes}", where=f"group_id={group_id}, field=variants")
        return group_id, prompt, chosen, rejected, variants

    def encode(self, sample: Mapping[str, Any]) -> EncodedSample | None:
        """Validate, tokenise and truncate one sample; ``None`` when it overflows and ``on_overflow='skip'``."""
        group_id, prompt, chosen, rejected, variants = self.validate(sample)
        prompt_ids = self.encode_prompt(prompt)
        variant_ids = [self.encode_prompt(text) for _, text in variants]
        reason = None
        if len(prompt_ids) >= self.max_length:
            reason = f"the prompt alone has {len(prompt_ids)} tokens, leaving no room for an answer"
        else:
            for (lang, _), ids in zip(variants, variant_ids):
                if len(ids) > self.max_length:
                    reason = f"variant lang={lang} has {len(ids)} tokens"
                    break
        if reason is not None:
            if self.on_overflow == "skip":
                self.skipped += 1
                return None
            raise DataError(
                f"sample does not fit max_length={self.max_length}: {reason}",
                where=f"group_id={group_id}",
                fix="lower data.max_prompt_length below data.max_length, or raise data.max_length",
            )
        budget = self.max_length - len(prompt_ids)
        return EncodedSample(
            group_id=group_id,
            prompt=prompt_ids,
            chosen=self.encode_answer(chosen)[:budget],
            rejected=self.encode_answer(rejected)[:budget],
            langs=[lang for lang, _ in variants],
            variants=variant_ids,
        )

    def overflows(self, sample: Mapping[str, Any]) -> bool:
        """Whether ``sample`` cannot fit ``max_length`` (for filtering a dataset before batching)."""
        prompt_ids = self.encode_prompt(_text(sample["prompt"], str(sample.get("group_id")), "prompt"))
        if len(prompt_ids) >= self.max_length:
            return True
        for _, text in (_variant(v, str(sample.get("group_id")), i) for i, v in enumerate(sample["variants"])):
            if len(self.encode_prompt(text)) > self.max_length:
                return True
        return False

    # ---------------------------------------------------------------------------------------------- the batch
    def __call__(self, samples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Collate samples (a list of mappings or a dict of columns) into the batch layout of the module docstring."""
        rows = _rows(samples)
        if not rows:
            raise DataError("cannot collate an empty batch", where="preference batch")
        skipped_before = self.skipped
        encoded = [e for e in (self.encode(s) for s in rows) if e is not None]
        n_skipped = self.skipped - skipped_before
        if not encoded:
            raise DataError(
                f"all {len(rows)} samples of the batch overflow max_length={self.max_length}",
                where="group_ids " + ", ".join(str(s.get("group_id")) for s in rows),
                fix="filter the dataset with PreferenceCollator.overflows before batching, or raise max_length",
            )
        ms = {e.group_id: len(e.variants) for e in encoded}
        if len(set(ms.values())) > 1:
            raise DataError(
                f"all samples in a batch must have the same number of variants m, got {ms}",
                where="preference batch",
                fix="choose the same m languages per item (raysafe.data.mixture.LanguageMixture)",
            )
        m = len(encoded[0].variants)
        seqs: list[list[int]] = []
        label_seqs: list[list[int]] = []
        for side in ("chosen", "rejected"):
            for e in encoded:
                answer = getattr(e, side)
                seqs.append(e.prompt + answer)
                label_seqs.append([IGNORE_INDEX] * len(e.prompt) + answer)
        for e in encoded:
            for ids in e.variants:
                seqs.append(ids)
                label_seqs.append([IGNORE_INDEX] * len(ids))
        batch = self._pad(seqs, label_seqs)
        n_pairs = len(encoded)
        lengths = torch.tensor([len(s) for s in seqs[2 * n_pairs :]], dtype=torch.long)
        width = batch["input_ids"].shape[1]
        offset = width - lengths if self.padding_side == "left" else torch.zeros_like(lengths)
        batch.update(
            variant_last_index=offset + lengths - 1,
            n_pairs=n_pairs,
            m=m,
            langs=[e.langs for e in encoded],
            group_ids=[e.group_id for e in encoded],
            n_skipped=n_skipped,
        )
        return batch

    def _pad(self, seqs: list[list[int]], label_seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            k = self.pad_to_multiple_of
            width = (width + k - 1) // k * k
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(seqs, label_seqs)):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            labels[i, span] = torch.tensor(lab, dtype=torch.long)
            attention_mask[i, span] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "labels": labels,
        }
