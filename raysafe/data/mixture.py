"""Language mixtures: which m languages of an item's prompt variants go into a training batch.

A :class:`LanguageMixture` holds the languages of a study with sampling weights. For each item,
:meth:`LanguageMixture.choose` draws m of the languages the item is available in, without replacement and with
probability proportional to weight at each draw (the anchor language first when it must always be included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from raysafe.errors import ConfigError, DataError

_LANG_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


class LanguageMixture:
    """m-of-n weighted language sampling with an optional always-included anchor language.

    ``weights`` default to uniform; a language with weight 0 is never sampled except as the anchor. Invalid
    settings (bad or duplicate codes, negative or all-zero weights, an anchor outside the list, m out of range)
    raise :class:`ConfigError`.
    """

    def __init__(
        self,
        languages: Sequence[str],
        weights: Sequence[float] | None = None,
        m: int = 2,
        anchor: str = "en",
        always_include_anchor: bool = True,
        seed: int | None = 0,
    ):
        languages = list(languages)
        if not languages:
            raise ConfigError("a language mixture needs at least one language", where="mixture.languages")
        bad = [lang for lang in languages if not isinstance(lang, str) or not _LANG_CODE.match(lang)]
        if bad:
            raise ConfigError(
                f"not language codes: {bad}", where="mixture.languages", fix="use ISO 639-1/3 codes such as 'en', 'zh'"
            )
        dupes = sorted({lang for lang in languages if languages.count(lang) > 1})
        if dupes:
            raise ConfigError(f"duplicate language(s) {dupes}", where="mixture.languages")
        if weights is None:
            weights = [1.0] * len(languages)
        weights = [float(w) for w in weights]
        if len(weights) != len(languages):
            raise ConfigError(f"{len(weights)} weights for {len(languages)} languages", where="mixture.weights")
        if any(not np.isfinite(w) or w < 0 for w in weights):
            raise ConfigError(f"weights must be finite and >= 0, got {weights}", where="mixture.weights")
        if always_include_anchor and anchor not in languages:
            raise ConfigError(
                f"anchor language {anchor!r} is not one of the mixture's languages {languages}",
                where="mixture.anchor",
                fix="add it to mixture.languages or choose another mixture.anchor",
            )
        if not 2 <= m <= len(languages):
            raise ConfigError(
                f"m={m} must lie between 2 and the number of languages ({len(languages)})",
                where="mixture.m",
                fix="the MLC loss needs at least 2 variants per item, drawn without replacement",
            )
        sampled = [w for lang, w in zip(languages, weights) if not (always_include_anchor and lang == anchor)]
        n_needed = m - 1 if always_include_anchor else m
        if sum(1 for w in sampled if w > 0) < n_needed:
            raise ConfigError(
                f"only {sum(1 for w in sampled if w > 0)} language(s) have a positive weight, m={m} needs {n_needed}",
                where="mixture.weights",
            )
        self.languages = languages
        self.weights = weights
        self.m = m
        self.anchor = anchor
        self.always_include_anchor = always_include_anchor
        self.rng = np.random.default_rng(seed)

    @property
    def probabilities(self) -> dict[str, float]:
        """Normalised weights per language (the first-draw probabilities)."""
        total = sum(self.weights)
        return {lang: w / total for lang, w in zip(self.languages, self.weights)}

    def choose(
        self, available_langs: Iterable[str], rng: np.random.Generator | None = None, group_id: str | None = None
    ) -> list[str]:
        """m distinct languages among ``available_langs``, in the mixture's language order.

        The anchor is taken first when ``always_include_anchor``; the others are drawn one at a time with
        probability proportional to weight among those not yet drawn. Raises :class:`DataError` (naming
        ``group_id``) when the item lacks the anchor or has fewer than m eligible languages.
        """
        rng = rng if rng is not None else self.rng
        available = set(available_langs)
        where = f"group_id={group_id}" if group_id is not None else "prompt variants"
        chosen: list[str] = []
        if self.always_include_anchor:
            if self.anchor not in available:
                raise DataError(f"the item has no variant in the anchor language {self.anchor!r}", where=where)
            chosen.append(self.anchor)
        pool = [
            (lang, w)
            for lang, w in zip(self.languages, self.weights)
            if lang in available and lang not in chosen and w > 0
        ]
        need = self.m - len(chosen)
        if len(pool) < need:
            raise DataError(
                f"the item has {len(pool) + len(chosen)} usable language(s) of the mixture, m={self.m} are needed",
                where=where,
                fix=f"available: {sorted(available)}; mixture: {self.languages}",
            )
        names = [lang for lang, _ in pool]
        weights = np.array([w for _, w in pool], dtype=np.float64)
        for _ in range(need):
            i = int(rng.choice(len(names), p=weights / weights.sum()))
            chosen.append(names.pop(i))
            weights = np.delete(weights, i)
        order = {lang: i for i, lang in enumerate(self.languages)}
        return sorted(chosen, key=order.__getitem__)

    @classmethod
    def dominant_balanced(
        cls,
        dominant: str,
        rest: Sequence[str],
        dominant_share: float,
        m: int,
        *,
        always_include_anchor: bool = False,
        seed: int | None = 0,
    ) -> LanguageMixture:
        """One dominant language with weight ``dominant_share`` and the ``rest`` sharing ``1 − dominant_share`` equally.

        The dominant language is the anchor (always included only if ``always_include_anchor``).
        """
        if not 0.0 < dominant_share < 1.0:
            raise ConfigError(
                f"dominant_share must lie in (0, 1), got {dominant_share}", where="mixture.dominant_share"
            )
        rest = list(rest)
        if not rest:
            raise ConfigError("a dominant/balanced mixture needs other languages", where="mixture.languages")
        weights = [dominant_share] + [(1.0 - dominant_share) / len(rest)] * len(rest)
        return cls(
            [dominant, *rest], weights, m=m, anchor=dominant, always_include_anchor=always_include_anchor, seed=seed
        )

    @classmethod
    def uniform(cls, languages: Sequence[str], m: int, anchor: str = "en", seed: int | None = 0) -> LanguageMixture:
        """Equal weights; the anchor is always included when it is one of ``languages``."""
        return cls(languages, None, m=m, anchor=anchor, always_include_anchor=anchor in languages, seed=seed)
