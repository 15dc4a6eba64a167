"""The search space of a sweep: its config, its validation, and its expansion into Tune's space and TrainConfigs.

Searched keys (``space.<key>`` → the TrainConfig field each trial overrides):

====================  =============================  ==========================================================
key                   TrainConfig field              values
====================  =============================  ==========================================================
``weight`` (λ)        ``mlc.weight``                 >= 0 (0 = the alignment loss alone, the control)
``beta`` (β)          ``loss.beta``                  > 0
``tau`` (τ)           ``mlc.tau``                    > 0
``layer``             ``mlc.layer``                  int 0..depth (``hidden_states`` index) or depth fraction (0, 1]
``lr``                ``optim.lr``                   > 0
``mixture``           ``mixture.*``                  language-mixture options (below), by name
``m``                 ``mixture.m``                  2 .. number of languages of every mixture option
====================  =============================  ==========================================================

Each key takes exactly one of ``grid`` (every value, crossed with the other grid keys), ``choice`` (one value
drawn per trial), ``uniform`` or ``loguniform`` (``[low, high]``, numeric keys except ``m``); a bare list is a
grid. Keys left out keep the base train config's value.

Language-mixture options (``space.mixture.grid`` / ``choice``), each becoming one or more named mixtures:

- ``fixed``: ``languages`` with optional sampling ``weights`` (default uniform);
- ``dominant_balanced``: a few ``dominant`` languages sharing ``dominant_share`` of the sampling weight, the other
  languages sharing the rest equally (the value-concepts paper's recommendation: a few dominant languages plus a
  balanced mix of the rest). The anchor is drawn for every prompt anyway, so the dominant languages are the
  *other* languages to favour; a dominant set holding only the anchor would equal the uniform mixture and is
  refused;
- ``dirichlet``: ``draws`` weight vectors drawn (seeded, at config time, so a resumed sweep sees the same ones)
  from a Dirichlet distribution over ``languages`` with ``concentration`` α (small α: peaked mixtures, large α:
  near-uniform ones).

The anchor language is always one of the m variants (``mixture.anchor``, default ``en``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from raysafe.config import Strict, set_path
from raysafe.data.languages import is_known
from raysafe.errors import ConfigError
from raysafe.train.config import MixtureSpec, TrainConfig

#: search key -> dotted TrainConfig path it overrides
TARGETS: dict[str, str] = {
    "weight": "mlc.weight",
    "beta": "loss.beta",
    "tau": "mlc.tau",
    "layer": "mlc.layer",
    "lr": "optim.lr",
    "m": "mixture.m",
}
NUMERIC_KEYS = ("weight", "beta", "tau", "layer", "lr", "m")
Number = Union[int, float]


class Axis(Strict):
    """Values of one searched key: exactly one of grid / choice / uniform / loguniform."""

    grid: list[Number] | None = None
    choice: list[Number] | None = None
    uniform: list[float] | None = Field(None, description="[low, high]")
    loguniform: list[float] | None = Field(None, description="[low, high], both > 0")

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, v: Any) -> Any:
        return {"grid": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _exactly_one(self) -> "Axis":
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        k = given[0]
        v = getattr(self, k)
        if k in ("grid", "choice") and not v:
            raise ValueError(f"{k} needs at least one value")
        if k in ("uniform", "loguniform"):
            if len(v) != 2 or not v[0] < v[1]:
                raise ValueError(f"{k} takes [low, high] with low < high, got {v}")
            if k == "loguniform" and v[0] <= 0:
                raise ValueError(f"loguniform needs low > 0, got {v}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        """The listed values (grid/choice) or the two bounds (uniform/loguniform)."""
        return list(getattr(self, self.kind))


class MixtureOption(Strict):
    """One entry of the language-mixture axis (see the module docstring)."""

    kind: Literal["fixed", "dominant_balanced", "dirichlet"] = "fixed"
    name: str | None = Field(None, description="label in params and tables (default: derived from the option)")
    languages: list[str]
    weights: list[float] | None = Field(None, description="fixed: sampling weights, one per language, > 0")
    anchor: str = "en"
    dominant: list[str] | None = Field(
        None,
        description="dominant_balanced: the favoured languages (besides the anchor, which every prompt has anyway)",
    )
    dominant_share: float = Field(0.5, description="dominant_balanced: their share of the sampling weight, in (0, 1)")

    @field_validator("dominant", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    concentration: float | list[float] = Field(1.0, description="dirichlet: α (one value, or one per language)")
    draws: int = Field(1, ge=1, description="dirichlet: weight vectors drawn")
    seed: int = Field(0, description="dirichlet: seed of the draws")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in " /\\,=")):
            raise ValueError(f"mixture names appear in params and paths: no spaces, '/', ',', '=' (got {v!r})")
        return v


class MixtureAxis(Strict):
    grid: list[MixtureOption] | None = None
    choice: list[MixtureOption] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, v: Any) -> Any:
        return {"grid": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _exactly_one(self) -> "MixtureAxis":
        given = [k for k in ("grid", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice (got {given or 'none'})")
        if not getattr(self, given[0]):
            raise ValueError(f"{given[0]} needs at least one mixture option")
        return self

    @property
    def kind(self) -> str:
        return "grid" if self.grid is not None else "choice"

    @property
    def options(self) -> list[MixtureOption]:
        return list(self.grid if self.grid is not None else self.choice)


class SearchSpace(Strict):
    """What a sweep varies; keys left out keep the base train config's value."""

    weight: Axis | None = Field(None, description="λ, the MLC weight (mlc.weight)")
    beta: Axis | None = Field(None, description="β of the alignment loss (loss.beta)")
    tau: Axis | None = Field(None, description="τ, the MLC temperature (mlc.tau)")
    layer: Axis | None = Field(
        None,
        description="MLC layer (mlc.layer): int 0..depth (hidden_states index; depth = final state after the "
        "final norm) or depth fraction (1.0 = the final state)",
    )
    lr: Axis | None = Field(None, description="learning rate (optim.lr)")
    mixture: MixtureAxis | None = Field(None, description="language-mixture options")
    m: Axis | None = Field(None, description="variants per prompt (mixture.m)")

    def axes(self) -> dict[str, Axis]:
        return {k: getattr(self, k) for k in NUMERIC_KEYS if getattr(self, k) is not None}


# --------------------------------------------------------------------------------------------------- mixtures
def _fmt(x: float) -> str:
    return f"{x:g}"


def expand_mixture(opt: MixtureOption, index: int) -> list[tuple[str, dict]]:
    """(name, MixtureSpec fields) for one option: one entry, or ``draws`` entries for a Dirichlet option.

    The caller validates first (:func:`validate_space`); Dirichlet draws use ``numpy.random.default_rng(seed)``.
    """
    base = {"languages": list(opt.languages), "anchor": opt.anchor}
    if opt.kind == "fixed":
        name = opt.name or (f"uniform{len(opt.languages)}" if opt.weights is None else f"fixed{index}")
        return [
            (
                name,
                {**base, "weights": None if opt.weights is None else [float(w) for w in opt.weights], "preset": "none"},
            )
        ]
    if opt.kind == "dominant_balanced":
        dom = [x for x in opt.languages if x in (opt.dominant or [])]  # in the option's language order
        rest = [x for x in opt.languages if x not in dom]
        w_dom, w_rest = opt.dominant_share / len(dom), (1.0 - opt.dominant_share) / len(rest)
        name = opt.name or f"dominant-{'+'.join(dom)}-{_fmt(opt.dominant_share)}"
        return [
            (
                name,
                {**base, "weights": [round(w_dom if x in dom else w_rest, 6) for x in opt.languages], "preset": "none"},
            )
        ]
    alpha = opt.concentration if isinstance(opt.concentration, list) else [opt.concentration] * len(opt.languages)
    rng = np.random.default_rng(opt.seed)
    draws = rng.dirichlet(np.asarray(alpha, dtype=np.float64), size=opt.draws)
    stem = opt.name or f"dirichlet-a{_fmt(alpha[0]) if len(set(alpha)) == 1 else 'v'}-s{opt.seed}"
    out = []
    for i, w in enumerate(draws):
        # a draw can underflow to exactly 0 for tiny α; keep every language reachable with a floor of 1e-6
        w = np.maximum(w, 1e-6)
        w = w / w.sum()
        out.append((f"{stem}-{i}", {**base, "weights": [round(float(x), 6) for x in w], "preset": "none"}))
    return out


def mixtures(space: SearchSpace) -> dict[str, dict]:
    """Every named mixture of the mixture axis, in order (empty when the axis is not searched)."""
    if space.mixture is None:
        return {}
    out: dict[str, dict] = {}
    for i, opt in enumerate(space.mixture.options):
        for name, spec in expand_mixture(opt, i):
            out[name] = spec
    return out


# ------------------------------------------------------------------------------------------------- validation
def _refuse(key: str, value: Any, what: str, fix: str) -> ConfigError:
    return ConfigError(f"search space: {what} (value {value!r})", where=f"space.{key}", fix=fix)


def _check_option_languages(opt: MixtureOption, key: str) -> None:
    """At least two known languages, each listed once, the anchor among them."""
    langs = opt.languages
    if len(langs) < 2:
        raise _refuse(
            f"{key}.languages",
            langs,
            "a mixture needs at least 2 languages (the MLC loss compares variants across languages)",
            "list at least two ISO 639-1 codes",
        )
    bad = [x for x in langs if not is_known(x)]
    if bad:
        raise _refuse(
            f"{key}.languages",
            bad,
            f"unknown language code(s) {bad}",
            "use ISO 639-1 codes such as en, zh, sw (or add codes to RAYSAFE_EXTRA_LANGS)",
        )
    dup = sorted({x for x in langs if langs.count(x) > 1})
    if dup:
        raise _refuse(f"{key}.languages", dup, f"language(s) {dup} listed twice", "list each language once")
    if opt.anchor not in langs:
        raise _refuse(
            f"{key}.anchor",
            opt.anchor,
            f"the anchor language is not one of the option's languages {langs}",
            "add the anchor to languages or set anchor to one of them",
        )


def _check_option_weights(opt: MixtureOption, key: str) -> None:
    """Sampling weights: one finite positive weight per language, and only for kind 'fixed'."""
    langs = opt.languages
    if opt.kind == "fixed" and opt.weights is not None:
        if len(opt.weights) != len(langs):
            raise _refuse(
                f"{key}.weights",
                opt.weights,
                f"{len(opt.weights)} weights for {len(langs)} languages",
                "give one weight per language, in the order of languages",
            )
        bad_w = [w for w in opt.weights if not (math.isfinite(w) and w > 0)]
        if bad_w:
            raise _refuse(
                f"{key}.weights",
                bad_w,
                "sampling weights must be finite and > 0",
                "give positive weights (leave a language out instead of giving it weight 0)",
            )
    if opt.kind != "fixed" and opt.weights is not None:
        raise _refuse(
            f"{key}.weights",
            opt.weights,
            f"weights apply to kind 'fixed' only, not {opt.kind!r}",
            "remove weights, or set kind: fixed",
        )


def _check_option_dominant(opt: MixtureOption, key: str) -> None:
    """kind 'dominant_balanced': dominant languages besides the anchor, some left over, a share in (0, 1)."""
    langs = opt.languages
    if opt.kind == "dominant_balanced":
        dom = opt.dominant or []
        outside = [x for x in dom if x not in langs]
        if outside:
            raise _refuse(
                f"{key}.dominant",
                outside,
                f"dominant language(s) {outside} are not among the option's languages {langs}",
                "choose the dominant languages from the option's languages",
            )
        if not [x for x in dom if x != opt.anchor]:
            raise _refuse(
                f"{key}.dominant",
                dom,
                f"no dominant language besides the anchor {opt.anchor!r}: the anchor "
                "is one of the m variants of every prompt anyway, so this mixture would equal the uniform one",
                "name the other languages to favour, e.g. dominant: [zh, ru]",
            )
        if len(set(dom)) == len(langs):
            raise _refuse(
                f"{key}.dominant",
                dom,
                "every language is dominant: no balanced rest is left",
                "leave some languages out of dominant (or use kind: fixed)",
            )
        if not 0 < opt.dominant_share < 1:
            raise _refuse(
                f"{key}.dominant_share",
                opt.dominant_share,
                "the dominant share must lie in (0, 1)",
                "e.g. 0.5: half of the sampling weight on the dominant languages",
            )


def _check_option_dirichlet(opt: MixtureOption, key: str) -> None:
    """kind 'dirichlet': one concentration or one per language, each finite and > 0."""
    langs = opt.languages
    if opt.kind == "dirichlet":
        alpha = opt.concentration if isinstance(opt.concentration, list) else [opt.concentration]
        if isinstance(opt.concentration, list) and len(alpha) != len(langs):
            raise _refuse(
                f"{key}.concentration",
                opt.concentration,
                f"{len(alpha)} concentrations for {len(langs)} languages",
                "give one α, or one per language",
            )
        bad_a = [a for a in alpha if not (math.isfinite(a) and a > 0)]
        if bad_a:
            raise _refuse(
                f"{key}.concentration",
                bad_a,
                "Dirichlet concentrations must be finite and > 0",
                "e.g. 1.0 (uniform over the simplex), 0.3 (peaked mixtures), 10 (near-uniform)",
            )


def _check_mixture_option(opt: MixtureOption, i: int) -> None:
    key = f"mixture[{i}]"
    _check_option_languages(opt, key)
    _check_option_weights(opt, key)
    _check_option_dominant(opt, key)
    _check_option_dirichlet(opt, key)


def _check_positive(key: str, axis: Axis, allow_zero: bool) -> None:
    vals = axis.values
    bad = [v for v in vals if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero)]
    if bad:
        rule = ">= 0" if allow_zero else "> 0"
        raise _refuse(key, bad, f"{key} must be {rule}", f"give values {rule} for space.{key}")


def _check_layer(axis: Axis, depth: int) -> None:
    """Every value (both bounds of a uniform range, read as depth fractions) must resolve to a layer of the model."""
    from raysafe.models.layers import resolve_layer

    if axis.kind == "loguniform":
        raise _refuse(
            "layer",
            axis.values,
            "layer takes grid, choice or uniform over a depth fraction",
            "e.g. layer: {grid: [0.25, 0.5, 12]} or layer: {uniform: [0.3, 0.7]}",
        )
    for v in axis.values:
        try:
            resolve_layer(float(v) if axis.kind == "uniform" else v, depth, where="space.layer")
        except ConfigError as e:
            raise _refuse("layer", v, e.what, e.fix) from None


def validate_space(space: SearchSpace, base: TrainConfig, depth: int) -> dict[str, dict]:
    """Refuse a bad search space before any trial starts; returns the named mixtures (or the base mixture).

    ``depth`` is the policy's number of decoder layers (read from its config).
    """
    for key, allow_zero in (("weight", True), ("beta", False), ("tau", False), ("lr", False)):
        axis = getattr(space, key)
        if axis is not None:
            _check_positive(key, axis, allow_zero)
    if space.layer is not None:
        _check_layer(space.layer, depth)
    if space.mixture is not None:
        for i, opt in enumerate(space.mixture.options):
            _check_mixture_option(opt, i)
        named = mixtures(space)
        seen: list[str] = []
        for i, opt in enumerate(space.mixture.options):
            for name, _ in expand_mixture(opt, i):
                if name in seen:
                    raise _refuse(
                        f"mixture[{i}].name",
                        name,
                        "two mixture options have the same name",
                        "give each option a distinct `name`",
                    )
                seen.append(name)
    else:
        mx = base.mixture
        named = {
            "base": {
                "languages": list(mx.languages),
                "weights": mx.weights,
                "anchor": mx.anchor,
                "preset": mx.preset,
                "dominant": mx.dominant,
                "dominant_share": mx.dominant_share,
            }
        }
    if space.m is not None:
        if space.m.kind in ("uniform", "loguniform"):
            raise _refuse("m", space.m.values, "m is a count: give grid or choice values", "e.g. m: {grid: [2, 4]}")
        bad = [v for v in space.m.values if not isinstance(v, int) or isinstance(v, bool) or v < 2]
        if bad:
            raise _refuse(
                "m", bad, "m must be an integer >= 2 (the MLC loss needs two variants per prompt)", "give integers >= 2"
            )
    ms = space.m.values if space.m is not None else [base.mixture.m]
    for name, spec in named.items():
        n = len(spec["languages"])
        too_many = [m for m in ms if m > n]
        if too_many:
            key = "m" if space.m is not None else "mixture"
            raise _refuse(
                key,
                too_many,
                f"m={too_many[0]} variants per prompt but mixture {name!r} offers only "
                f"{n} language(s) {spec['languages']}",
                f"lower m to <= {n}, or add languages to mixture {name!r}",
            )
    return named


# -------------------------------------------------------------------------------------------------- expansion
def param_space(space: SearchSpace, named: dict[str, dict], algorithm: str) -> dict[str, Any]:
    """Tune's ``param_space``: one flat entry per searched key (the mixture by name).

    ``algorithm='grid'``: grid keys become ``tune.grid_search`` (crossed), choice/range keys are sampled per trial;
    ``'random'``: every key is sampled (grid values are drawn as a choice).
    """
    from ray import tune

    out: dict[str, Any] = {}
    for key, axis in space.axes().items():
        kind = axis.kind
        if kind == "grid":
            out[key] = tune.grid_search(axis.values) if algorithm == "grid" else tune.choice(axis.values)
        elif kind == "choice":
            out[key] = tune.choice(axis.values)
        elif kind == "uniform":
            out[key] = tune.uniform(*axis.values)
        else:
            out[key] = tune.loguniform(*axis.values)
    if space.mixture is not None:
        names = list(named)
        out["mixture"] = (
            tune.grid_search(names) if space.mixture.kind == "grid" and algorithm == "grid" else tune.choice(names)
        )
    return out


def grid_size(space: SearchSpace, named: dict[str, dict], algorithm: str) -> int:
    """Trials per sample of the space: the product of the grid sizes (1 for a random search)."""
    if algorithm != "grid":
        return 1
    n = 1
    for axis in space.axes().values():
        if axis.kind == "grid":
            n *= len(axis.values)
    if space.mixture is not None and space.mixture.kind == "grid":
        n *= len(named)
    return n


def overrides(params: dict[str, Any], named: dict[str, dict]) -> dict[str, Any]:
    """Dotted TrainConfig overrides of one trial's params (mixture fields expanded from its name)."""
    out: dict[str, Any] = {}
    for key, path in TARGETS.items():
        if key in params:
            value = params[key]
            if key == "m":
                value = int(value)
            out[path] = value
    if "mixture" in params:
        spec = named[params["mixture"]]
        for field, value in spec.items():
            out[f"mixture.{field}"] = value
    return out


def apply_overrides(tree: dict, dotted: dict[str, Any]) -> dict:
    """A copy of the nested dict ``tree`` with ``{"a.b": v}`` set (:func:`raysafe.config.set_path`)."""
    import copy

    out = copy.deepcopy(tree)
    for path, value in dotted.items():
        set_path(out, path, value)
    return out


def trial_train_config(
    base: TrainConfig, params: dict[str, Any], named: dict[str, dict], fixed: dict[str, Any] | None = None
) -> TrainConfig:
    """The TrainConfig of one trial: the base, the trial's params, then ``fixed`` (resources, storage, name)."""
    tree = apply_overrides(base.model_dump(mode="json"), {**overrides(params, named), **(fixed or {})})
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:  # a searched value the train config refuses
        raise ConfigError(
            f"trial parameters {params} do not form a valid train config: {e}",
            where="space",
            fix="check the searched values against docs/training.md",
        ) from None


def mixture_spec(named: dict[str, dict], name: str, m: int) -> MixtureSpec:
    return MixtureSpec.model_validate({**named[name], "m": m})
