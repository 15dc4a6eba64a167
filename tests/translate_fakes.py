"""Fake language identifiers for the translation tests (``quality.langid: translate_fakes:NAME``).

Tiny random MT models write byte noise, which no real identifier can place; these answer by position instead, so a
test decides which outputs the language check accepts. Importable in Ray workers: Ray gives them the driver's
sys.path, and pytest puts tests/ on it.
"""

from __future__ import annotations


def says_zh(texts: list[str]) -> list[tuple[str, float]]:
    """Every output is Chinese, with certainty."""
    return [("zh", 1.0) for _ in texts]


def zh_then_tagalog(texts: list[str]) -> list[tuple[str, float]]:
    """Outputs at even positions of a call are Chinese; odd ones are identified as Tagalog."""
    return [("zh", 1.0) if i % 2 == 0 else ("tl", 0.99) for i in range(len(texts))]
