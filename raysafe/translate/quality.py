"""Quality of one translation: the language its output is in, how well it survives a round trip, its length, its
unknown tokens — and the flags thresholds make of those scores.

Scores are pure functions of texts (and token counts) so they can be tested against closed forms and an independent
implementation; the language identifier is loaded once per actor (``make_identifier``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from raysafe.errors import ConfigError
from raysafe.translate.codes import langid_code

Identifier = Callable[[list[str]], list[tuple[str, float]]]
FLAG_REASONS = ("empty", "langid", "round_trip", "length", "unk")


def length_ratio(output: str, source: str) -> float:
    """len(output) / len(source) in Unicode characters after stripping (NaN for an empty source)."""
    n = len(source.strip())
    return len(output.strip()) / n if n else math.nan


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (sacrebleu defaults: character 6-grams, β = 2), 0..100."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(hypothesis, [reference]).score)


def unk_rate(n_unk: int | None, n_tokens: int | None) -> float:
    """Share of the output's tokens that are the tokenizer's unknown token (NaN when not measured)."""
    if n_unk is None or not n_tokens:
        return math.nan
    return n_unk / n_tokens


def langid_identifier() -> Identifier:
    """langid.py (Lui & Baldwin 2012) with normalised probabilities; its model ships inside the package."""
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError:
        raise ConfigError(
            "quality.langid is 'langid' but the langid package is not installed",
            where="quality.langid",
            fix="pip install langid (listed in pyproject.toml), or set quality.langid: off",
        ) from None
    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return lambda texts: [tuple(ident.classify(t)) if t.strip() else ("", 0.0) for t in texts]


def make_identifier(name: str) -> Identifier | None:
    """The identifier ``quality.langid`` names: 'langid', 'off' (None) or 'module:function'."""
    if name == "off":
        return None
    if name == "langid":
        return langid_identifier()
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"cannot import the language identifier {name!r}: {e}",
            where="quality.langid",
            fix="give 'langid', 'off', or an importable 'module:function' returning (lang, probability) per text",
        ) from None


def identifier_languages(name: str) -> frozenset[str] | None:
    """Languages the identifier can answer (None: unknown, assume all)."""
    if name != "langid":
        return None
    from langid.langid import LanguageIdentifier, model

    return frozenset(LanguageIdentifier.from_modelstring(model).nb_classes)


@dataclass(frozen=True)
class Thresholds:
    min_langid_prob: float
    min_chrf: float
    min_length_ratio: float
    max_length_ratio: float
    max_unk_rate: float
    langid_accept: dict[str, list[str]]


def flag_reasons(
    *,
    target: str,
    text: str,
    langid_lang: str | None,
    langid_prob: float | None,
    chrf_round_trip: float | None,
    ratio: float,
    unk: float,
    t: Thresholds,
) -> list[str]:
    """Why a translation into ``target`` fails the checks (empty list: it passes). A score that was not measured
    (None / NaN: identifier off or not covering the language, round trip off) never flags."""
    if not text.strip():
        return ["empty"]
    out = []
    if langid_lang is not None and langid_lang != "":
        ok = {langid_code(target), *t.langid_accept.get(target, [])}
        if langid_lang not in ok or (langid_prob is not None and langid_prob < t.min_langid_prob):
            out.append("langid")
    if chrf_round_trip is not None and not math.isnan(chrf_round_trip) and chrf_round_trip < t.min_chrf:
        out.append("round_trip")
    if not math.isnan(ratio) and not (t.min_length_ratio <= ratio <= t.max_length_ratio):
        out.append("length")
    if not math.isnan(unk) and unk > t.max_unk_rate:
        out.append("unk")
    return out
