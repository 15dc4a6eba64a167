"""The steering stage of the concept flow: pick vectors, held-out pairs and neutral text, sweep alpha and layers.

``run_concept_steering(model, tokenizer, spec, ...)`` steers with a SOURCE language's concept vector (default
English) at chosen layers and measures, per target language and alpha (see :mod:`raysafe.models.steering`):
the shift of the concept projection of held-out test pairs, the behaviour score (log-prob of the positive minus the
negative side) and the perplexity of neutral text. With ``spec.generate.enabled`` it also generates continuations
of held-out positive sides (e.g. harmful requests) under steering and scores each continuation with a *probe
judge*: the continuation counts as exhibiting the concept when the unsteered model's state at the probe layer (last
token) projects on the target language's concept direction above the midpoint of the held-out positive and negative
means. That judge is a representation probe, not a safety classifier; its rate is reported as
``judged_concept_rate``.

Problems that concern one concept, language or layer (no source vector, a steering layer out of range, no neutral
text for a language) become status rows; the other measurements complete.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field, field_validator

from raysafe.config import SourceSpec, Strict
from raysafe.errors import RaysafeError
from raysafe.models.layers import num_layers
from raysafe.models.steering import (
    _encode,
    steering,
    sweep_steering,
    text_stats,
)

log = logging.getLogger(__name__)


class GenerateSpec(Strict):
    """Generation under steering, scored by the probe judge (see the module docstring)."""

    enabled: bool = False
    concepts: list[str] = Field(["harmfulness", "toxicity"], description="concepts whose steering also generates")
    n_prompts: int = Field(4, ge=1, description="held-out positive sides per target language used as prompts")
    max_new_tokens: int = Field(24, ge=1)


class ConceptSteeringSpec(Strict):
    """Cross-lingual control: add ``alpha * v`` (v = the source language's concept vector) after chosen layers."""

    enabled: bool = True
    source_lang: str = "en"
    concepts: list[str] | None = Field(None, description="concepts to steer (None: every analysed concept)")
    target_langs: list[str] | None = Field(None, description="languages to measure (None: every analysed language)")
    alphas: list[float] = [-4.0, -2.0, 0.0, 2.0, 4.0]
    layers: Literal["selected"] | list[int | list[int]] = Field(
        "selected",
        description="steered layer sets: 'selected' = each concept's train-selected layer; a list of ints steers "
        "each layer alone, an inner list steers those layers together (1-based: layer L = output of decoder layer L)",
    )
    vector: Literal["raw", "unit"] = Field(
        "raw",
        description="raw: the concept vector as fitted (alpha 1 moves by the mean pair difference); unit: |v| = 1",
    )
    probe_layer: Literal["steered"] | int = Field(
        "steered", description="layer whose last-token state is projected; 'steered': the deepest steered layer"
    )
    n_pairs: int = Field(8, ge=1, description="held-out (test split) pairs per target language")
    neutral: SourceSpec = Field(
        SourceSpec(kind="fixture", name="safety_prompts"),
        description="texts whose perplexity measures the cost of steering",
    )
    neutral_label: int | None = Field(0, description="keep neutral rows with this label (None: all rows)")
    n_neutral: int = Field(8, ge=1, description="neutral texts per target language")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(128, ge=4)
    device: str | None = Field(None, description="torch device for the steering model (None: cuda if available)")
    torch_threads: int | None = Field(None, ge=1)
    generate: GenerateSpec = GenerateSpec()

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v):
        if not v:
            raise ValueError("give at least one alpha")
        return sorted(dict.fromkeys(float(a) for a in v))


@dataclass
class SteeringOutput:
    """``measurements``: one row per (concept, layer set, target language, alpha); ``generations``: one row per
    generated continuation; ``judged``: judged concept rate per (concept, layers, lang, alpha); ``status`` rows."""

    measurements: pl.DataFrame
    generations: pl.DataFrame
    judged: pl.DataFrame
    status: list[dict] = field(default_factory=list)


def _status(concept: str | None, lang: str | None, layer: int | None, message: str, status: str = "skipped") -> dict:
    return {"scope": "steering", "concept": concept, "lang": lang, "layer": layer, "status": status, "message": message}


def layer_sets(spec: ConceptSteeringSpec, selected_layer: int | None) -> list[list[int]]:
    """The configured layer sets for one concept (``selected``: its train-selected layer)."""
    if spec.layers == "selected":
        return [[selected_layer]] if selected_layer is not None else []
    return [[x] if isinstance(x, int) else list(dict.fromkeys(x)) for x in spec.layers]


def held_out_pairs(pairs: pl.DataFrame, concept: str, lang: str, n: int) -> list[tuple[str, str]]:
    """The first ``n`` test-split pairs (by group_id) of a concept in a language, as (positive, negative)."""
    part = pairs.filter((pl.col("concept") == concept) & (pl.col("lang") == lang) & (pl.col("split") == "test"))
    return list(part.sort("group_id").head(n).select("positive", "negative").iter_rows())


def neutral_texts(neutral: pl.DataFrame | None, lang: str, n: int, label: int | None) -> list[str]:
    if neutral is None or neutral.height == 0:
        return []
    part = neutral.filter(pl.col("lang") == lang)
    if label is not None and "label" in part.columns:
        part = part.filter(pl.col("label") == label)
    return part.head(n)["text"].to_list()


def _vectors(vectors: pl.DataFrame, concept: str, lang: str, kind: str) -> dict[int, np.ndarray]:
    part = vectors.filter((pl.col("concept") == concept) & (pl.col("lang") == lang))
    return {int(layer): np.asarray(v, dtype=np.float32) for layer, v in part.select("layer", kind).iter_rows()}


@torch.inference_mode()
def generate_continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, max_length: int) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batch; any active steering applies); only the new text."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        ids, mask = _encode(tokenizer, prompts, max_length)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def _projections(
    model, tokenizer, texts: Sequence[str], layer: int, u: np.ndarray, spec: ConceptSteeringSpec
) -> np.ndarray:
    st = text_stats(
        model,
        tokenizer,
        texts,
        probe_layer=layer,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        logprobs=False,
    )
    return st.last_state.astype(np.float64) @ u


def judge_generations(
    model,
    tokenizer,
    concept: str,
    label: str,
    vectors_by_layer: Mapping[int, np.ndarray],
    held_out: Mapping[str, list[tuple[str, str]]],
    probe: Mapping[str, tuple[int, np.ndarray]],
    spec: ConceptSteeringSpec,
) -> tuple[list[dict], list[dict]]:
    """Generate under steering for each target language and alpha and score each continuation with the probe
    judge; returns (generation rows, per-(lang, alpha) rate rows)."""
    gens, rates = [], []
    for lang, pairs in sorted(held_out.items()):
        layer, vec = probe[lang]
        u = np.asarray(vec, np.float64) / (np.linalg.norm(vec) or 1.0)
        pos = [p for p, _ in pairs]
        neg = [n for _, n in pairs]
        threshold = 0.5 * (
            _projections(model, tokenizer, pos, layer, u, spec).mean()
            + _projections(model, tokenizer, neg, layer, u, spec).mean()
        )
        prompts = pos[: spec.generate.n_prompts]
        for alpha in spec.alphas:
            ctx = steering(model, vectors_by_layer, alpha) if alpha != 0 else nullcontext()
            with ctx:
                outs = generate_continuations(model, tokenizer, prompts, spec.generate.max_new_tokens, spec.max_length)
            scored = [i for i, o in enumerate(outs) if o.strip()]
            proj = np.full(len(outs), np.nan)
            if scored:
                proj[scored] = _projections(model, tokenizer, [outs[i] for i in scored], layer, u, spec)
            for prompt, out, p in zip(prompts, outs, proj):
                gens.append(
                    {
                        "concept": concept,
                        "layers": label,
                        "lang": lang,
                        "alpha": float(alpha),
                        "prompt": prompt,
                        "continuation": out,
                        "probe_projection": float(p),
                        "judged_concept": bool(p > threshold) if np.isfinite(p) else None,
                    }
                )
            judged = proj[np.isfinite(proj)] > threshold
            rates.append(
                {
                    "concept": concept,
                    "layers": label,
                    "lang": lang,
                    "alpha": float(alpha),
                    "n_generated": len(outs),
                    "n_judged": int(judged.size),
                    "threshold": float(threshold),
                    "judged_concept_rate": float(judged.mean()) if judged.size else float("nan"),
                }
            )
    return gens, rates


GEN_SCHEMA = {
    "concept": pl.String,
    "layers": pl.String,
    "lang": pl.String,
    "alpha": pl.Float64,
    "prompt": pl.String,
    "continuation": pl.String,
    "probe_projection": pl.Float64,
    "judged_concept": pl.Boolean,
}
RATE_SCHEMA = {
    "concept": pl.String,
    "layers": pl.String,
    "lang": pl.String,
    "alpha": pl.Float64,
    "n_generated": pl.Int64,
    "n_judged": pl.Int64,
    "threshold": pl.Float64,
    "judged_concept_rate": pl.Float64,
}


def run_concept_steering(
    model,
    tokenizer,
    spec: ConceptSteeringSpec,
    *,
    model_label: str,
    vectors: pl.DataFrame,
    concept_layers: pl.DataFrame,
    pairs: pl.DataFrame,
    neutral: pl.DataFrame | None,
    analysed_langs: Mapping[str, list[str]],
) -> SteeringOutput:
    """Steering measurements for one model (already loaded). ``vectors`` / ``concept_layers`` are tables of the
    concept analysis; ``pairs`` the concept-pair rows (with texts); ``analysed_langs[concept]`` the languages
    analysed for each concept."""
    n_layers = num_layers(model)
    acc = _Collected()
    status = acc.status
    selected = dict(concept_layers.select("concept", "layer_selected_on_train").iter_rows())
    concepts = spec.concepts if spec.concepts is not None else sorted(analysed_langs)
    for concept in concepts:
        langs = analysed_langs.get(concept, [])
        if spec.source_lang not in langs:
            status.append(
                _status(
                    concept,
                    spec.source_lang,
                    None,
                    f"no {concept!r} vector in source language {spec.source_lang!r} for {model_label} "
                    f"(analysed languages: {langs or 'none'}); steering of this concept skipped",
                )
            )
            continue
        source = _vectors(vectors, concept, spec.source_lang, spec.vector)
        texts = _target_texts(spec, concept, langs, pairs, neutral, status)
        if texts is None:
            continue
        for layer_set in layer_sets(spec, selected.get(concept)):
            p_layer = _probe_layer(spec, concept, layer_set, source, n_layers, model_label, status)
            if p_layer is None:
                continue
            _steer_layer_set(
                model, tokenizer, spec, model_label, concept, layer_set, p_layer, vectors, source, texts, acc
            )
    frames, gens, rates = acc.frames, acc.gens, acc.rates
    measurements = pl.concat(frames, how="diagonal") if frames else pl.DataFrame()
    if measurements.height:
        first = ["model", "concept", "source_lang", "layers", "lang", "alpha"]
        measurements = measurements.select(first + [c for c in measurements.columns if c not in first])
    generations = pl.DataFrame(gens, schema=GEN_SCHEMA, orient="row").with_columns(model=pl.lit(model_label))
    judged = pl.DataFrame(rates, schema=RATE_SCHEMA, orient="row").with_columns(model=pl.lit(model_label))
    return SteeringOutput(measurements, generations, judged, status)


@dataclass
class _Collected:
    """What :func:`run_concept_steering` gathers over its concepts and layer sets."""

    frames: list[pl.DataFrame] = field(default_factory=list)
    gens: list = field(default_factory=list)
    rates: list = field(default_factory=list)
    status: list[dict] = field(default_factory=list)


def _target_texts(
    spec: ConceptSteeringSpec,
    concept: str,
    langs: list[str],
    pairs: pl.DataFrame,
    neutral: pl.DataFrame | None,
    status: list[dict],
) -> tuple[dict, dict] | None:
    """The held-out pairs and neutral texts of each analysed target language of ``concept`` (None: no target
    language was analysed); a status row for each target left out or without neutral text."""
    targets = [t for t in (spec.target_langs or langs)]
    for t in targets:
        if t not in langs:
            status.append(
                _status(
                    concept,
                    t,
                    None,
                    f"target language {t!r} has no analysed {concept!r} pairs; left out of steering",
                )
            )
    targets = [t for t in targets if t in langs]
    if not targets:
        return None
    held_out = {t: held_out_pairs(pairs, concept, t, spec.n_pairs) for t in targets}
    for t in [t for t, p in held_out.items() if not p]:
        status.append(_status(concept, t, None, f"no test-split pairs of {concept!r} in {t!r}; left out of steering"))
    held_out = {t: p for t, p in held_out.items() if p}
    neutral_by_lang = {t: neutral_texts(neutral, t, spec.n_neutral, spec.neutral_label) for t in held_out}
    for t in [t for t, texts in neutral_by_lang.items() if not texts]:
        status.append(
            _status(concept, t, None, f"no neutral text in language {t!r}; its perplexity is NaN", status="warning")
        )
    return held_out, neutral_by_lang


def _probe_layer(
    spec: ConceptSteeringSpec,
    concept: str,
    layer_set: list[int],
    source: dict[int, np.ndarray],
    n_layers: int,
    model_label: str,
    status: list[dict],
) -> int | None:
    """The probe layer of one layer set after checking the set against the model and the source vectors (None:
    the set is skipped); a status row for each problem found."""
    label = ",".join(map(str, layer_set))
    bad = [L for L in layer_set if not 1 <= L <= n_layers]
    if bad:
        status.append(
            _status(
                concept,
                None,
                bad[0],
                f"steering layer(s) {bad} out of range for {model_label}, which has {n_layers} "
                f"decoder layers (use 1..{n_layers}); layer set [{label}] skipped",
            )
        )
        return None
    missing = [L for L in layer_set if L not in source]
    if missing:
        status.append(
            _status(
                concept,
                spec.source_lang,
                missing[0],
                f"layer(s) {missing} were not analysed, so there is no {concept!r} vector to steer "
                f"with; add them to `layers`; layer set [{label}] skipped",
            )
        )
        return None
    if n_layers in layer_set:
        status.append(
            _status(
                concept,
                None,
                n_layers,
                f"layer {n_layers} vectors come from the final-norm output but are added before "
                "the norm; prefer an earlier layer",
                status="warning",
            )
        )
    p_layer = max(layer_set) if spec.probe_layer == "steered" else int(spec.probe_layer)
    if not 1 <= p_layer <= n_layers:
        status.append(
            _status(
                concept,
                None,
                p_layer,
                f"probe layer {p_layer} out of range 1..{n_layers}; layer set [{label}] skipped",
            )
        )
        return None
    if p_layer < max(layer_set):
        status.append(
            _status(
                concept,
                None,
                p_layer,
                f"probe layer {p_layer} lies before steered layer(s) [{label}], so the projection cannot shift",
                status="warning",
            )
        )
    return p_layer


def _steer_layer_set(
    model,
    tokenizer,
    spec: ConceptSteeringSpec,
    model_label: str,
    concept: str,
    layer_set: list[int],
    p_layer: int,
    vectors: pl.DataFrame,
    source: dict[int, np.ndarray],
    texts: tuple[dict, dict],
    acc: _Collected,
) -> None:
    """Sweep one layer set over the alphas with the source vectors (and generate under steering where
    configured), probing each target language on its own direction at ``p_layer`` (the source's where it has
    none); a failure becomes a status row."""
    held_out, neutral_by_lang = texts
    probe = {}
    for t in held_out:
        own = _vectors(vectors, concept, t, "unit").get(p_layer)
        if own is None:
            own = source.get(p_layer, source[max(layer_set)])
        probe[t] = (p_layer, own)
    steer = {L: source[L] for L in layer_set}
    label = ",".join(map(str, layer_set))
    log.info(
        "steering %s: %s from %s at layer(s) [%s], alphas %s, targets %s",
        model_label,
        concept,
        spec.source_lang,
        label,
        spec.alphas,
        sorted(held_out),
    )
    try:
        df = sweep_steering(
            model,
            tokenizer,
            steer,
            [layer_set],
            spec.alphas,
            held_out,
            neutral_by_lang,
            probe=probe,
            batch_size=spec.batch_size,
            max_length=spec.max_length,
        )
        acc.frames.append(
            df.with_columns(model=pl.lit(model_label), concept=pl.lit(concept), source_lang=pl.lit(spec.source_lang))
        )
        if spec.generate.enabled and concept in spec.generate.concepts:
            g, r = judge_generations(model, tokenizer, concept, label, steer, held_out, probe, spec)
            acc.gens.extend(g)
            acc.rates.extend(r)
    except RaysafeError as err:
        acc.status.append(
            _status(
                concept,
                None,
                max(layer_set),
                f"steering {concept!r} at [{label}] failed: {' '.join(str(err).split())}",
            )
        )
