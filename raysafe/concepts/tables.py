"""Streaming driver of the value-concept analysis: reads one layer at a time and returns tidy polars tables.

``analyse_concepts(read_layer, model, layers, options)`` calls ``read_layer(model, layer) -> (meta, X)`` once per
layer (``meta`` has ``row_id, group_id, concept, lang, split, label``; ``X`` is float32 [n, d]; each concept pair
contributes a ``label == 1`` row for its positive side and a ``label == 0`` row for its negative side, matched by
``(concept, group_id, lang)``). Only the current layer's activations are held in memory. Problems that concern one
concept, language or layer become rows of the ``status`` table and the rest of the analysis completes.

Tables returned (every one carries ``model``):

``vectors_summary``  concept, lang, layer, method, n_train, n_test, norm, status, message
``vectors``          concept, lang, layer, method, norm, raw, unit   (only with ``options.keep_vectors``)
``recognition``      per layer: train_cv_acc, train_cv_margin, train_acc, test_acc, test_margin
``recognition_best`` per (concept, lang): layer_selected_on_train, test_acc_at_train_selected_layer,
                     layer_selected_on_test, test_acc_at_test_selected_layer (optimistic, as reported in the paper)
``concept_layers``   per concept: layer_selected_on_train (mean train-CV accuracy over languages) and its scores
``consistency``      per layer: cosine between every unordered pair of languages' concept vectors
``consistency_summary`` per (concept | "mean", lang pair): max_cosine (over layers), layer_of_max,
                     cosine_at_concept_layer
``consistency_curve`` per (concept | "mean", layer): mean cosine over language pairs
``transfer``         per layer: acc(A->B), acc(B->B), delta = acc(A->B) - acc(B->B)
``transfer_best``    delta per (concept | "mean", source, target) at each concept's train-selected layer
``transfer_max``     the paper's matrix: max over layers of acc(A->B) minus max over layers of acc(B->B)
``transfer_asymmetry`` per concept | "mean": mean delta of high->low vs low->high pairs
``language_distance`` URIEL distances per language pair and distance type
``distance_pairs``   similarity and 1 - distance per (concept | "mean", lang pair, distance type), pair_group
``distance_correlation`` Pearson / Spearman of similarity vs 1 - distance per concept, distance type and subset
                     (all | involves_high | low_low)
``status``           scope (concept | layer | uriel | correlation), concept, lang, layer, status (skipped |
                     warning), message
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import polars as pl

from raysafe.concepts import vectors as C
from raysafe.concepts.language_distance import (
    DEFAULT_DISTANCE_TYPES,
    DISTANCE_SCHEMA,
    DISTANCE_SOURCES,
    DISTANCE_TYPES,
    LanguageDistances,
    language_distances,
)
from raysafe.errors import ConfigError, DataError, RaysafeError

ReadLayer = Callable[[str, int], tuple[pl.DataFrame, np.ndarray]]

# Languages treated as high-resource unless the model has its own list (ConceptOptions.high_resource_by_model):
# the languages with the most web text and instruction data; everything else counts as low-resource.
DEFAULT_HIGH_RESOURCE: tuple[str, ...] = ("en", "zh", "es", "fr", "de", "ja", "ru", "pt", "it", "ar", "ko")

META_COLUMNS = ("row_id", "group_id", "concept", "lang", "split", "label")
MEAN = "mean"  # the concept name used for rows averaged over concepts


@dataclass(frozen=True)
class ConceptOptions:
    """Options of the concept analysis (see docs/concepts.md).

    method: ``mean_diff`` (paper) | ``pca`` (RepE-style) | ``logistic``; min_pairs: least number of pairs a
    (concept, language) needs in each split; selection_folds: folds of the train-only cross-validation that picks
    layers; high_resource / high_resource_by_model: which languages count as high-resource (per model name, falling
    back to ``high_resource``); exclude_by_model: languages left out per model (as Xu et al.'s utils.py
    ``llama_exclude`` / ``qwen_exclude`` / ``bloomz_exclude``); distance_types: URIEL distances to correlate with; iso3_overrides: ISO 639-3 code per
    language code where the default mapping is not wanted (e.g. ``{"zh": "cmn"}``); distance_source: ``auto`` |
    ``lang2vec`` (its precomputed distances, as the paper) | ``uriel_features`` (language_distance); similarity_summary: which
    similarity per language pair enters the distance correlation (``max_over_layers`` | ``best_layer``);
    num_layers: when given, layers outside ``0..num_layers`` are reported instead of read; keep_vectors: return the
    vectors themselves; logistic_C, seed: for the logistic probe and the CV folds.
    """

    method: str = "mean_diff"
    min_pairs: int = 8
    selection_folds: int = 5
    high_resource: tuple[str, ...] = DEFAULT_HIGH_RESOURCE
    high_resource_by_model: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclude_by_model: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    distance_types: tuple[str, ...] = DEFAULT_DISTANCE_TYPES
    iso3_overrides: Mapping[str, str] = field(default_factory=dict)
    distance_source: str = "auto"
    similarity_summary: str = "max_over_layers"
    num_layers: int | None = None
    keep_vectors: bool = True
    logistic_C: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in C.METHODS:
            raise ConfigError(
                f"unknown concept-vector method {self.method!r}",
                where="ConceptOptions.method",
                fix=f"use one of {', '.join(C.METHODS)}",
            )
        if self.min_pairs < 1:
            raise ConfigError("min_pairs must be at least 1", where="ConceptOptions.min_pairs")
        if self.selection_folds < 2:
            raise ConfigError("selection_folds must be at least 2", where="ConceptOptions.selection_folds")
        bad = [d for d in self.distance_types if d not in DISTANCE_TYPES]
        if bad:
            raise ConfigError(
                f"unknown distance type(s) {bad}",
                where="ConceptOptions.distance_types",
                fix=f"use some of {', '.join(DISTANCE_TYPES)}",
            )
        if self.distance_source not in DISTANCE_SOURCES:
            raise ConfigError(
                f"unknown distance source {self.distance_source!r}",
                where="ConceptOptions.distance_source",
                fix=f"use one of {', '.join(DISTANCE_SOURCES)}",
            )
        if self.similarity_summary not in ("max_over_layers", "best_layer"):
            raise ConfigError(
                f"unknown similarity_summary {self.similarity_summary!r}",
                where="ConceptOptions.similarity_summary",
                fix="use max_over_layers or best_layer",
            )
        if self.logistic_C <= 0:
            raise ConfigError("logistic_C must be positive", where="ConceptOptions.logistic_C")

    def high_resource_for(self, model: str) -> set[str]:
        """The high-resource language codes for ``model``."""
        return set(self.high_resource_by_model.get(model, self.high_resource))

    def excluded_for(self, model: str) -> frozenset[str]:
        """Languages left out of every analysis of ``model`` (``exclude_by_model``; none by default)."""
        return frozenset(self.exclude_by_model.get(model, ()))


# ----------------------------------------------------------------------------------------------- pair index


@dataclass(frozen=True)
class PairIndex:
    """Row positions of matched pairs: ``pairs[(concept, lang, split)] = (pos_rows, neg_rows)`` (sorted by
    group_id), the usable (concept, lang) combinations, and problems found while matching."""

    pairs: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]
    usable: dict[str, list[str]]
    problems: list[dict]


def validate_meta(meta: pl.DataFrame, X: np.ndarray, where: str) -> None:
    """Raise DataError unless ``meta`` has the required columns, labels in {0, 1}, splits in {train, test}, and
    one row per row of the 2-D array ``X``."""
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise DataError(
            f"activation metadata lacks column(s) {missing}",
            where=where,
            fix=f"read_layer must return meta with columns {list(META_COLUMNS)}",
        )
    if X.ndim != 2 or X.shape[0] != meta.height:
        raise DataError(
            f"activations have shape {X.shape} but metadata has {meta.height} rows",
            where=where,
            fix="read_layer must return one activation row per metadata row",
        )
    bad_label = meta.filter(~pl.col("label").is_in([0, 1]))
    if bad_label.height:
        raise DataError(
            f"label must be 0 or 1, found {bad_label['label'].unique().to_list()}",
            where=where,
            fix="label 1 marks the positive side of a pair, 0 the negative side",
        )
    bad_split = meta.filter(~pl.col("split").is_in(["train", "test"]))
    if bad_split.height:
        raise DataError(
            f"split must be 'train' or 'test', found {bad_split['split'].unique().to_list()}",
            where=where,
            fix="assign every concept pair to the train or the test split",
        )


def build_pair_index(meta: pl.DataFrame, min_pairs: int, exclude: frozenset[str] = frozenset()) -> PairIndex:
    """Match the two sides of each pair by (concept, group_id, lang), drop incomplete or duplicated pairs
    (reported), and mark (concept, lang) usable when both splits have at least ``min_pairs`` pairs and the language
    is not in ``exclude`` (excluded languages get a status row)."""
    m = meta.select(META_COLUMNS).with_row_index("_row")
    grouped, problems = _matched_groups(m)
    pairs: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
    for (concept, lang, split), part in grouped.filter(pl.col("ok")).group_by(["concept", "lang", "split"]):
        pairs[(concept, lang, split)] = (
            part["pos"].to_numpy().astype(np.int64),
            part["neg"].to_numpy().astype(np.int64),
        )
    usable, usable_problems = _usable_languages(m, pairs, min_pairs, exclude)
    return PairIndex(pairs=pairs, usable=usable, problems=problems + usable_problems)


def _matched_groups(m: pl.DataFrame) -> tuple[pl.DataFrame, list[dict]]:
    """The rows ``m`` (with ``_row``) grouped by (concept, lang, group_id) with their positive and negative row,
    ``ok`` where the group is exactly one positive and one negative in one split; a warning row per (concept,
    lang) with dropped groups."""
    grouped = (
        m.group_by(["concept", "lang", "group_id"])
        .agg(
            n=pl.len(),
            n_pos=(pl.col("label") == 1).sum(),
            n_split=pl.col("split").n_unique(),
            split=pl.col("split").first(),
            pos=pl.col("_row").filter(pl.col("label") == 1).first(),
            neg=pl.col("_row").filter(pl.col("label") == 0).first(),
        )
        .with_columns(ok=(pl.col("n") == 2) & (pl.col("n_pos") == 1) & (pl.col("n_split") == 1))
        .sort(["concept", "lang", "group_id"])
    )
    problems: list[dict] = []
    for row in (
        grouped.filter(~pl.col("ok"))
        .group_by(["concept", "lang"])
        .agg(pl.len())
        .sort(["concept", "lang"])
        .iter_rows(named=True)
    ):
        problems.append(
            _status(
                "concept",
                row["concept"],
                row["lang"],
                None,
                f"{row['len']} pair(s) of concept {row['concept']!r} in language {row['lang']!r} "
                "dropped: not exactly one positive (label 1) and one negative (label 0) row in one split",
                status="warning",
            )
        )
    return grouped, problems


def _usable_languages(
    m: pl.DataFrame,
    pairs: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]],
    min_pairs: int,
    exclude: frozenset[str],
) -> tuple[dict[str, list[str]], list[dict]]:
    """The usable languages of each concept (not excluded, at least ``min_pairs`` pairs in both splits) and a
    status row for each excluded language, each left-out (concept, lang) and each concept with under 2."""
    problems: list[dict] = []
    usable: dict[str, list[str]] = {}
    combos = m.select("concept", "lang").unique().sort(["concept", "lang"])
    for lang in sorted(exclude & set(combos["lang"].to_list())):
        problems.append(
            _status(
                "concept", None, lang, None, f"language {lang!r} excluded for this model (analysis.exclude_by_model)"
            )
        )
    for concept, lang in combos.iter_rows():
        if lang in exclude:
            continue
        n_train = len(pairs.get((concept, lang, "train"), ((), ()))[0])
        n_test = len(pairs.get((concept, lang, "test"), ((), ()))[0])
        if n_train >= min_pairs and n_test >= min_pairs:
            usable.setdefault(concept, []).append(lang)
        else:
            problems.append(
                _status(
                    "concept",
                    concept,
                    lang,
                    None,
                    f"concept {concept!r} in language {lang!r} has too few pairs (train {n_train}, "
                    f"test {n_test}; min_pairs {min_pairs}); left out of the analysis",
                )
            )
    for concept in combos["concept"].unique().sort().to_list():
        if len(usable.get(concept, [])) < 2:
            problems.append(
                _status(
                    "concept",
                    concept,
                    None,
                    None,
                    f"concept {concept!r} has {len(usable.get(concept, []))} usable language(s); "
                    "consistency and transfer need at least 2",
                    status="warning",
                )
            )
    return usable, problems


def _status(
    scope: str, concept: str | None, lang: str | None, layer: int | None, message: str, status: str = "skipped"
) -> dict:
    """A status row: ``status`` is ``skipped`` (left out of the analysis) or ``warning`` (analysed, but see message)."""
    return {"scope": scope, "concept": concept, "lang": lang, "layer": layer, "status": status, "message": message}


# -------------------------------------------------------------------------------------------- per-layer work


@dataclass
class _Accumulator:
    """Rows collected across layers (plain dicts; turned into DataFrames at the end)."""

    summary: list[dict] = field(default_factory=list)
    recognition: list[dict] = field(default_factory=list)
    consistency: list[dict] = field(default_factory=list)
    transfer: list[dict] = field(default_factory=list)
    vectors: list[dict] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)
    unit: list[np.ndarray] = field(default_factory=list)
    status: list[dict] = field(default_factory=list)


def analyse_layer(X: np.ndarray, index: PairIndex, layer: int, options: ConceptOptions, acc: _Accumulator) -> None:
    """Everything computed from one layer: concept vectors, recognition, consistency cosines, transfer."""
    for concept, langs in sorted(index.usable.items()):
        vecs, test_pos, test_neg = [], [], []
        for lang in langs:
            tr_p, tr_n = index.pairs[(concept, lang, "train")]
            te_p, te_n = index.pairs[(concept, lang, "test")]
            P, N, TP, TN = X[tr_p], X[tr_n], X[te_p], X[te_n]
            cv = C.concept_vector(P, N, options.method, logistic_C=options.logistic_C, seed=options.seed)
            cv_acc, cv_margin = C.cross_validated_accuracy(
                P, N, options.method, folds=options.selection_folds, seed=options.seed, logistic_C=options.logistic_C
            )
            key = {"concept": concept, "lang": lang, "layer": layer, "method": options.method}
            acc.summary.append(
                {**key, "n_train": len(tr_p), "n_test": len(te_p), "norm": cv.norm, "status": "ok", "message": None}
            )
            acc.recognition.append(
                {
                    **key,
                    "n_train": len(tr_p),
                    "n_test": len(te_p),
                    "train_cv_acc": cv_acc,
                    "train_cv_margin": cv_margin,
                    "train_acc": C.pair_accuracy(cv.raw, P, N),
                    "test_acc": C.pair_accuracy(cv.raw, TP, TN),
                    "test_margin": C.normalised_margin(cv.raw, TP, TN),
                }
            )
            if options.keep_vectors:
                acc.vectors.append({**key, "norm": cv.norm})
                acc.raw.append(cv.raw.astype(np.float32))
                acc.unit.append(cv.unit.astype(np.float32))
            vecs.append(cv.raw)
            test_pos.append(TP)
            test_neg.append(TN)
        if len(langs) < 2:
            continue
        V = np.stack(vecs)
        cos = C.cosine_matrix(V)
        for i, j in combinations(range(len(langs)), 2):
            acc.consistency.append(
                {"concept": concept, "layer": layer, "lang_a": langs[i], "lang_b": langs[j], "cosine": float(cos[i, j])}
            )
        tacc = C.transfer_accuracy(V, test_pos, test_neg)
        delta = C.transfer_delta(tacc)
        for i, src in enumerate(langs):
            for j, tgt in enumerate(langs):
                acc.transfer.append(
                    {
                        "concept": concept,
                        "layer": layer,
                        "source_lang": src,
                        "target_lang": tgt,
                        "acc": float(tacc[i, j]),
                        "acc_target_own": float(tacc[j, j]),
                        "delta": float(delta[i, j]),
                    }
                )


# ------------------------------------------------------------------------------------------------- schemas

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "vectors_summary": {
        "concept": pl.String,
        "lang": pl.String,
        "layer": pl.Int64,
        "method": pl.String,
        "n_train": pl.Int64,
        "n_test": pl.Int64,
        "norm": pl.Float64,
        "status": pl.String,
        "message": pl.String,
    },
    "recognition": {
        "concept": pl.String,
        "lang": pl.String,
        "layer": pl.Int64,
        "method": pl.String,
        "n_train": pl.Int64,
        "n_test": pl.Int64,
        "train_cv_acc": pl.Float64,
        "train_cv_margin": pl.Float64,
        "train_acc": pl.Float64,
        "test_acc": pl.Float64,
        "test_margin": pl.Float64,
    },
    "consistency": {
        "concept": pl.String,
        "layer": pl.Int64,
        "lang_a": pl.String,
        "lang_b": pl.String,
        "cosine": pl.Float64,
    },
    "transfer": {
        "concept": pl.String,
        "layer": pl.Int64,
        "source_lang": pl.String,
        "target_lang": pl.String,
        "acc": pl.Float64,
        "acc_target_own": pl.Float64,
        "delta": pl.Float64,
    },
    "status": {
        "scope": pl.String,
        "concept": pl.String,
        "lang": pl.String,
        "layer": pl.Int64,
        "status": pl.String,
        "message": pl.String,
    },
    "vectors_meta": {
        "concept": pl.String,
        "lang": pl.String,
        "layer": pl.Int64,
        "method": pl.String,
        "norm": pl.Float64,
    },
}


def _frame(rows: list[dict], name: str, model: str) -> pl.DataFrame:
    df = pl.DataFrame(rows, schema=SCHEMAS[name], orient="row") if rows else pl.DataFrame(schema=SCHEMAS[name])
    return df.select(pl.lit(model).alias("model"), pl.all())


# ------------------------------------------------------------------------------------------------- driver


def analyse_concepts(
    read_layer: ReadLayer, model: str, layers: list[int], options: ConceptOptions | None = None
) -> dict[str, pl.DataFrame]:
    """Run the whole concept analysis for one model over ``layers``, one layer in memory at a time; see the module
    docstring for the tables. Bad layers, too-small (concept, language) cells and languages URIEL lacks become
    ``status`` rows; a metadata contract violation (missing column, bad label/split, rows in a different order
    than in the first layer read) raises DataError."""
    options = options or ConceptOptions()
    if not layers:
        raise ConfigError("no layers to analyse", where="analyse_concepts(layers=...)", fix="pass at least one layer")
    acc = _Accumulator()
    index: PairIndex | None = None
    first_rows: pl.Series | None = None
    for layer in dict.fromkeys(layers):
        if layer < 0 or (options.num_layers is not None and layer > options.num_layers):
            limit = f"0..{options.num_layers}" if options.num_layers is not None else ">= 0"
            acc.status.append(
                _status(
                    "layer", None, None, layer, f"layer {layer} is out of range ({limit}) for model {model!r}; skipped"
                )
            )
            continue
        try:
            meta, X = read_layer(model, layer)
        except (RaysafeError, IndexError, KeyError, FileNotFoundError) as err:
            acc.status.append(
                _status(
                    "layer",
                    None,
                    None,
                    layer,
                    f"layer {layer} of model {model!r} could not be read: {' '.join(str(err).split())}; skipped",
                )
            )
            continue
        X = np.asarray(X)
        where = f"model {model!r}, layer {layer}"
        validate_meta(meta, X, where)
        if index is None:
            index = build_pair_index(meta, options.min_pairs, options.excluded_for(model))
            first_rows = meta["row_id"]
            acc.status.extend(index.problems)
        elif not meta["row_id"].equals(first_rows):
            raise DataError(
                "activation rows are not in the same order as in the first layer read",
                where=where,
                fix="read_layer must return the rows of every layer in the same order",
            )
        analyse_layer(X, index, layer, options, acc)
        del X
    return _assemble(acc, index, model, options)


def _assemble(
    acc: _Accumulator, index: PairIndex | None, model: str, options: ConceptOptions
) -> dict[str, pl.DataFrame]:
    """Turn the per-layer rows into the final tables and the cross-layer summaries."""
    skipped = [
        {
            "concept": s["concept"],
            "lang": s["lang"],
            "layer": None,
            "method": options.method,
            "n_train": None,
            "n_test": None,
            "norm": None,
            "status": "skipped",
            "message": s["message"],
        }
        for s in acc.status
        if s["scope"] == "concept" and s["lang"] is not None and s["status"] == "skipped"
    ]
    tables: dict[str, pl.DataFrame] = {
        "vectors_summary": _frame(acc.summary + skipped, "vectors_summary", model),
        "recognition": _frame(acc.recognition, "recognition", model),
        "consistency": _frame(acc.consistency, "consistency", model),
        "transfer": _frame(acc.transfer, "transfer", model),
    }
    if options.keep_vectors:
        meta = _frame(acc.vectors, "vectors_meta", model)
        if acc.raw:
            meta = meta.with_columns(pl.Series("raw", np.stack(acc.raw)), pl.Series("unit", np.stack(acc.unit)))
        else:
            meta = meta.with_columns(
                pl.lit(None, pl.List(pl.Float32)).alias("raw"), pl.lit(None, pl.List(pl.Float32)).alias("unit")
            )
        tables["vectors"] = meta
    tables["recognition_best"] = recognition_best(tables["recognition"])
    tables["concept_layers"] = concept_layers(tables["recognition"])
    layer_of = dict(tables["concept_layers"].select("concept", "layer_selected_on_train").iter_rows())
    tables["consistency_summary"] = consistency_summary(tables["consistency"], layer_of)
    tables["consistency_curve"] = consistency_curve(tables["consistency"])
    tables["transfer_best"] = transfer_best(tables["transfer"], layer_of)
    tables["transfer_max"] = transfer_max(tables["transfer"])
    high = options.high_resource_for(model)
    tables["transfer_asymmetry"] = transfer_asymmetry_table(tables["transfer_best"], high)
    dist = _uriel_distances(acc, index, options)
    tables["language_distance"] = dist.table.select(pl.lit(model).alias("model"), pl.all())
    column = "max_cosine" if options.similarity_summary == "max_over_layers" else "cosine_at_concept_layer"
    tables["distance_pairs"] = distance_pairs(tables["consistency_summary"], dist.table, high, column)
    tables["distance_correlation"] = distance_correlation(tables["distance_pairs"], acc.status)
    tables["status"] = _frame(acc.status, "status", model)
    return tables


def _uriel_distances(acc: _Accumulator, index: PairIndex | None, options: ConceptOptions) -> LanguageDistances:
    """The URIEL distances between the usable languages (empty, with a status row, when there is no URIEL data);
    a status row per language without a distance and for the source's note."""
    langs = sorted({lang for ls in (index.usable.values() if index else []) for lang in ls})
    try:
        dist = language_distances(langs, options.distance_types, dict(options.iso3_overrides), options.distance_source)
    except DataError as err:  # no URIEL data at all (lang2vec missing): the rest of the analysis still stands
        dist = LanguageDistances(pl.DataFrame(schema=DISTANCE_SCHEMA), {})
        acc.status.append(
            _status(
                "uriel",
                None,
                None,
                None,
                f"no URIEL distances: {' '.join(str(err).split())}; the distance correlation is empty",
            )
        )
    for lang, why in sorted(dist.missing.items()):
        acc.status.append(_status("uriel", None, lang, None, why, status="warning"))
    if dist.note:
        acc.status.append(_status("uriel", None, None, None, dist.note, status="warning"))
    return dist


# --------------------------------------------------------------------------------------- cross-layer summaries


def recognition_best(recognition: pl.DataFrame) -> pl.DataFrame:
    """Per (model, concept, lang): the layer chosen on TRAIN data (best train-CV accuracy, ties -> higher train-CV
    margin, then the lower layer) with its test accuracy, and separately the layer with the best TEST accuracy
    (ties -> higher test margin) with that accuracy, which is optimistic because the test data chose it."""
    rows = []
    for (model, concept, lang), part in recognition.sort("layer").group_by(
        ["model", "concept", "lang"], maintain_order=True
    ):
        layers = part["layer"].to_numpy()
        i = C.best_index(part["train_cv_acc"].to_numpy(), part["train_cv_margin"].to_numpy())
        j = C.best_index(part["test_acc"].to_numpy(), part["test_margin"].to_numpy())
        rows.append(
            {
                "model": model,
                "concept": concept,
                "lang": lang,
                "layer_selected_on_train": int(layers[i]),
                "train_cv_acc_at_train_selected_layer": float(part["train_cv_acc"][i]),
                "test_acc_at_train_selected_layer": float(part["test_acc"][i]),
                "layer_selected_on_test": int(layers[j]),
                "test_acc_at_test_selected_layer": float(part["test_acc"][j]),
            }
        )
    schema = {
        "model": pl.String,
        "concept": pl.String,
        "lang": pl.String,
        "layer_selected_on_train": pl.Int64,
        "train_cv_acc_at_train_selected_layer": pl.Float64,
        "test_acc_at_train_selected_layer": pl.Float64,
        "layer_selected_on_test": pl.Int64,
        "test_acc_at_test_selected_layer": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema).sort(["model", "concept", "lang"])


def concept_layers(recognition: pl.DataFrame) -> pl.DataFrame:
    """Per (model, concept): the layer with the best mean train-CV accuracy over languages (ties -> higher mean
    train-CV margin, then the lower layer), used for the per-concept heatmaps and transfer summary."""
    per_layer = (
        recognition.group_by(["model", "concept", "layer"])
        .agg(
            mean_train_cv_acc=pl.col("train_cv_acc").mean(),
            mean_train_cv_margin=pl.col("train_cv_margin").mean(),
            mean_test_acc=pl.col("test_acc").mean(),
        )
        .sort(["model", "concept", "layer"])
    )
    rows = []
    for (model, concept), part in per_layer.group_by(["model", "concept"], maintain_order=True):
        i = C.best_index(part["mean_train_cv_acc"].to_numpy(), part["mean_train_cv_margin"].to_numpy())
        rows.append(
            {
                "model": model,
                "concept": concept,
                "layer_selected_on_train": int(part["layer"][i]),
                "mean_train_cv_acc": float(part["mean_train_cv_acc"][i]),
                "mean_test_acc": float(part["mean_test_acc"][i]),
            }
        )
    schema = {
        "model": pl.String,
        "concept": pl.String,
        "layer_selected_on_train": pl.Int64,
        "mean_train_cv_acc": pl.Float64,
        "mean_test_acc": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def consistency_summary(consistency: pl.DataFrame, layer_of: Mapping[str, int]) -> pl.DataFrame:
    """Per (concept, lang pair): the max cosine over layers and where it occurs, and the cosine at the concept's
    train-selected layer; plus ``concept == "mean"`` rows averaging both over concepts."""
    layer_df = pl.DataFrame(
        {"concept": list(layer_of), "_sel": list(layer_of.values())}, schema={"concept": pl.String, "_sel": pl.Int64}
    )
    per = (
        consistency.join(layer_df, on="concept", how="left")
        .sort(["concept", "lang_a", "lang_b", "layer"])
        .group_by(["model", "concept", "lang_a", "lang_b"], maintain_order=True)
        .agg(
            max_cosine=pl.col("cosine").max(),
            layer_of_max=pl.col("layer").gather(pl.col("cosine").arg_max()).first(),
            cosine_at_concept_layer=pl.col("cosine").filter(pl.col("layer") == pl.col("_sel")).first(),
        )
        .with_columns(pl.col("layer_of_max").cast(pl.Int64))
    )
    mean = (
        per.group_by(["model", "lang_a", "lang_b"])
        .agg(pl.col("max_cosine").mean(), pl.col("cosine_at_concept_layer").mean(), n_concepts=pl.len())
        .with_columns(concept=pl.lit(MEAN), layer_of_max=pl.lit(None, pl.Int64))
    )
    per = per.with_columns(n_concepts=pl.lit(1, pl.UInt32))
    cols = [
        "model",
        "concept",
        "lang_a",
        "lang_b",
        "max_cosine",
        "layer_of_max",
        "cosine_at_concept_layer",
        "n_concepts",
    ]
    return pl.concat([per.select(cols), mean.select(cols)]).sort(["concept", "lang_a", "lang_b"])


def consistency_curve(consistency: pl.DataFrame) -> pl.DataFrame:
    """Mean cosine over language pairs per (concept, layer), plus ``concept == "mean"`` averaged over concepts."""
    per = consistency.group_by(["model", "concept", "layer"]).agg(mean_cosine=pl.col("cosine").mean(), n_pairs=pl.len())
    mean = (
        per.group_by(["model", "layer"])
        .agg(pl.col("mean_cosine").mean(), pl.col("n_pairs").sum())
        .with_columns(concept=pl.lit(MEAN))
    )
    cols = ["model", "concept", "layer", "mean_cosine", "n_pairs"]
    return pl.concat([per.select(cols), mean.select(cols)]).sort(["concept", "layer"])


def transfer_best(transfer: pl.DataFrame, layer_of: Mapping[str, int]) -> pl.DataFrame:
    """The transfer matrix of each concept at its train-selected layer, plus ``concept == "mean"`` (delta averaged
    over concepts for each source/target pair)."""
    layer_df = pl.DataFrame(
        {"concept": list(layer_of), "layer": list(layer_of.values())}, schema={"concept": pl.String, "layer": pl.Int64}
    )
    per = transfer.join(layer_df, on=["concept", "layer"], how="inner")
    mean = (
        per.group_by(["model", "source_lang", "target_lang"])
        .agg(pl.col("acc").mean(), pl.col("acc_target_own").mean(), pl.col("delta").mean())
        .with_columns(concept=pl.lit(MEAN), layer=pl.lit(None, pl.Int64))
    )
    cols = ["model", "concept", "layer", "source_lang", "target_lang", "acc", "acc_target_own", "delta"]
    return pl.concat([per.select(cols), mean.select(cols)]).sort(["concept", "source_lang", "target_lang"])


def transfer_max(transfer: pl.DataFrame) -> pl.DataFrame:
    """The paper's transfer matrix (Xu et al., transferability_analysis.py ``draw_acc_heatmap``): per concept, source A
    and target B, ``acc`` = max over layers of acc(A→B) and ``acc_target_own`` = max over layers of acc(B→B), each
    maximised on its own, ``delta = acc − acc_target_own``; ``layer`` = the layer of the max of acc(A→B) (lowest on
    ties). ``concept == "mean"`` averages ``acc`` and ``acc_target_own`` over concepts (so its delta is the mean delta),
    as the paper's heatmaps. Layers are chosen on the test pairs: an optimistic summary beside ``transfer_best``."""
    cols = ["model", "concept", "layer", "source_lang", "target_lang", "acc", "acc_target_own", "delta"]
    if transfer.height == 0:
        return pl.DataFrame(schema={c: transfer.schema.get(c, pl.Float64) for c in cols})
    keys = ["model", "concept", "source_lang", "target_lang"]
    best_src = (
        transfer.sort(["acc", "layer"], descending=[True, False])
        .group_by(keys, maintain_order=True)
        .agg(pl.col("acc").first(), pl.col("layer").first())
    )
    own = (
        transfer.filter(pl.col("source_lang") == pl.col("target_lang"))
        .group_by(["model", "concept", "target_lang"])
        .agg(pl.col("acc").max().alias("acc_target_own"))
    )
    per = best_src.join(own, on=["model", "concept", "target_lang"], how="left").with_columns(
        delta=pl.col("acc") - pl.col("acc_target_own")
    )
    mean = (
        per.group_by(["model", "source_lang", "target_lang"])
        .agg(pl.col("acc").mean(), pl.col("acc_target_own").mean())
        .with_columns(
            concept=pl.lit(MEAN), layer=pl.lit(None, pl.Int64), delta=pl.col("acc") - pl.col("acc_target_own")
        )
    )
    return pl.concat([per.select(cols), mean.select(cols)]).sort(["concept", "source_lang", "target_lang"])


def transfer_asymmetry_table(transfer_best_df: pl.DataFrame, high: set[str]) -> pl.DataFrame:
    """Per concept (and "mean"): mean delta over high->low pairs vs low->high pairs (see concepts.transfer_asymmetry)."""
    rows = []
    for (model, concept), part in transfer_best_df.group_by(["model", "concept"], maintain_order=True):
        langs = sorted(set(part["source_lang"]) | set(part["target_lang"]))
        pos = {lang: i for i, lang in enumerate(langs)}
        delta = np.full((len(langs), len(langs)), np.nan)
        for s, t, d in part.select("source_lang", "target_lang", "delta").iter_rows():
            delta[pos[s], pos[t]] = d
        rows.append({"model": model, "concept": concept, **C.transfer_asymmetry(delta, langs, high)})
    schema = {
        "model": pl.String,
        "concept": pl.String,
        "mean_high_to_low": pl.Float64,
        "mean_low_to_high": pl.Float64,
        "high_minus_low": pl.Float64,
        "n_high_to_low": pl.Int64,
        "n_low_to_high": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema).sort("concept")


def pair_group(a: str, b: str, high: set[str]) -> str:
    """``high_high``, ``high_low`` or ``low_low`` for a language pair."""
    n = int(a in high) + int(b in high)
    return ("low_low", "high_low", "high_high")[n]


def distance_pairs(summary: pl.DataFrame, distances: pl.DataFrame, high: set[str], column: str) -> pl.DataFrame:
    """Join each language pair's similarity (``column`` of the consistency summary) with its URIEL distances;
    adds ``relatedness = 1 - distance`` and the pair's resource group."""
    joined = summary.select("model", "concept", "lang_a", "lang_b", pl.col(column).alias("similarity")).join(
        distances.select("lang_a", "lang_b", "distance_type", "distance"), on=["lang_a", "lang_b"], how="inner"
    )
    groups = [pair_group(a, b, high) for a, b in joined.select("lang_a", "lang_b").iter_rows()]
    return joined.with_columns(
        relatedness=1.0 - pl.col("distance"), pair_group=pl.Series(groups, dtype=pl.String)
    ).sort(["concept", "distance_type", "lang_a", "lang_b"])


SUBSETS: dict[str, tuple[str, ...]] = {
    "all": ("high_high", "high_low", "low_low"),
    "involves_high": ("high_high", "high_low"),
    "low_low": ("low_low",),
}


def distance_correlation(pairs: pl.DataFrame, status: list[dict]) -> pl.DataFrame:
    """Pearson and Spearman correlation between similarity and relatedness (1 - distance) per model, concept,
    distance type and subset of language pairs; subsets with fewer than 3 pairs get NaN and a status row."""
    rows = []
    for (model, concept, dt), part in pairs.group_by(["model", "concept", "distance_type"], maintain_order=True):
        for subset, groups in SUBSETS.items():
            sub = part.filter(pl.col("pair_group").is_in(groups))
            r = C.correlate(sub["similarity"].to_numpy(), sub["relatedness"].to_numpy())
            if r["n"] < 3:
                status.append(
                    _status(
                        "correlation",
                        concept,
                        None,
                        None,
                        f"{dt} correlation for concept {concept!r}, {subset} pairs: only {r['n']} "
                        "language pair(s); needs at least 3",
                        status="warning",
                    )
                )
            rows.append({"model": model, "concept": concept, "distance_type": dt, "subset": subset, **r})
    schema = {
        "model": pl.String,
        "concept": pl.String,
        "distance_type": pl.String,
        "subset": pl.String,
        "n": pl.Int64,
        "pearson_r": pl.Float64,
        "pearson_p": pl.Float64,
        "spearman_rho": pl.Float64,
        "spearman_p": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema).sort(["concept", "distance_type", "subset"])


def select_concept_vectors(
    vectors: pl.DataFrame, concept: str, lang: str = "en", layers: list[int] | None = None, kind: str = "raw"
) -> dict[int, np.ndarray]:
    """``{layer: vector}`` of one concept and source language (default English) from the ``vectors`` table, as
    steering input; ``kind`` is ``raw`` or ``unit``. Raises DataError when a requested layer is absent."""
    if kind not in ("raw", "unit"):
        raise ConfigError(f"unknown vector kind {kind!r}", fix="use 'raw' or 'unit'")
    part = vectors.filter((pl.col("concept") == concept) & (pl.col("lang") == lang))
    found = {int(layer): np.asarray(v, dtype=np.float32) for layer, v in part.select("layer", kind).iter_rows()}
    wanted = layers if layers is not None else sorted(found)
    absent = [layer for layer in wanted if layer not in found]
    if absent or not wanted:
        raise DataError(
            f"no {concept!r} vector for language {lang!r} at layer(s) {absent or wanted}",
            where="vectors table",
            fix="analyse those layers first, or pick layers that were analysed",
        )
    return {layer: found[layer] for layer in wanted}
