"""Objectives of a sweep as pure functions of a trial's flat metrics dict: score, constraints, Pareto front, best.

- **score** (always maximised): ``w₀·s₀(primary) + Σ_k w_k·s_k(metric_k)`` with ``s(x) = x`` for a ``max`` term and
  ``−x`` for a ``min`` term. With no extra terms it is the primary metric (negated when minimised).
- **constraints**: ``min``/``max`` bounds on metrics; a trial is feasible when it meets all of them.
- **Pareto front** over ``pareto`` terms: the trials no other trial dominates (at least as good in every term,
  strictly better in one). Trials with a missing or NaN value in any term are left out.
- **best**: the feasible trial with the highest score (ties: the earliest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, model_validator

from raysafe.config import Strict


class Term(Strict):
    metric: str
    mode: Literal["max", "min"] = "max"
    weight: float = Field(1.0, ge=0, description="weight in the score")


class Constraint(Strict):
    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bound(self) -> "Constraint":
        if self.min is None and self.max is None:
            raise ValueError(f"constraint on {self.metric!r} needs `min` or `max`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"constraint on {self.metric!r}: min {self.min} > max {self.max}")
        return self


class ObjectiveSpec(Strict):
    """What makes a trial good. ``score`` = primary (+ weighted ``terms``), maximised; ``constraints`` filter;
    ``pareto`` lists the trade-off axes of the Pareto front and plot (at least two)."""

    primary: Term = Term(metric="safety_mean", mode="max")
    terms: list[Term] = Field(default_factory=list, description="extra weighted terms of the score")
    constraints: list[Constraint] = Field(default_factory=list)
    pareto: list[Term] = Field(
        default_factory=lambda: [Term(metric="safety_mean", mode="max"), Term(metric="safety_variance", mode="min")]
    )

    @model_validator(mode="after")
    def _pareto(self) -> "ObjectiveSpec":
        if len(self.pareto) < 2:
            raise ValueError("pareto needs at least two metrics (a front over one metric is just its best value)")
        names = [t.metric for t in self.pareto]
        if len(set(names)) != len(names):
            raise ValueError(f"pareto lists a metric twice: {names}")
        return self

    def metrics(self) -> list[str]:
        """Every metric name the objective reads."""
        names = [
            self.primary.metric,
            *(t.metric for t in self.terms),
            *(c.metric for c in self.constraints),
            *(t.metric for t in self.pareto),
        ]
        return list(dict.fromkeys(names))


def _value(metrics: Mapping[str, float], name: str) -> float:
    v = metrics.get(name)
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def signed(value: float, mode: str) -> float:
    """``value`` for a maximised metric, ``−value`` for a minimised one (so larger is always better)."""
    return value if mode == "max" else -value


def score(metrics: Mapping[str, float], primary: Term, terms: Sequence[Term] = ()) -> float:
    """``w₀·s(primary) + Σ w_k·s(term_k)``; NaN when any metric it needs is missing or NaN."""
    total = 0.0
    for t in (primary, *terms):
        v = _value(metrics, t.metric)
        if math.isnan(v):
            return float("nan")
        total += t.weight * signed(v, t.mode)
    return total


def violations(metrics: Mapping[str, float], constraints: Sequence[Constraint]) -> list[str]:
    """The constraints a trial breaks, as readable strings (a missing/NaN metric breaks its constraint)."""
    out = []
    for c in constraints:
        v = _value(metrics, c.metric)
        if math.isnan(v):
            out.append(f"{c.metric} is missing")
        elif c.min is not None and v < c.min:
            out.append(f"{c.metric} = {v:.4g} < {c.min:g}")
        elif c.max is not None and v > c.max:
            out.append(f"{c.metric} = {v:.4g} > {c.max:g}")
    return out


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether point ``a`` Pareto-dominates ``b``: no worse in every coordinate, strictly better in one."""
    better = False
    for x, y, mode in zip(a, b, modes):
        sx, sy = signed(x, mode), signed(y, mode)
        if sx < sy:
            return False
        if sx > sy:
            better = True
    return better


def pareto_front(rows: Sequence[Mapping[str, float]], terms: Sequence[Term]) -> list[int]:
    """Indices (ascending) of the rows on the Pareto front over ``terms``; rows with a missing/NaN value are out.

    Duplicated points are all on the front (neither dominates the other).
    """
    modes = [t.mode for t in terms]
    points: dict[int, list[float]] = {}
    for i, r in enumerate(rows):
        p = [_value(r, t.metric) for t in terms]
        if not any(math.isnan(x) for x in p):
            points[i] = p
    return [i for i, p in points.items() if not any(dominates(q, p, modes) for j, q in points.items() if j != i)]


def best_index(rows: Sequence[Mapping[str, float]], objective: ObjectiveSpec) -> int | None:
    """The feasible row with the highest score (the earliest on ties); None when no row is feasible and scored."""
    best, best_score = None, -math.inf
    for i, r in enumerate(rows):
        s = score(r, objective.primary, objective.terms)
        if math.isnan(s) or violations(r, objective.constraints):
            continue
        if s > best_score:
            best, best_score = i, s
    return best
