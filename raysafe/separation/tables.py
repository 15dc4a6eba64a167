"""Per-language separation analysis of base vs aligned models: a streaming driver that turns activations into tidy
tables.

The activation store is reached through a callable ``read_layer(model, layer) -> (meta, X)``: ``meta`` is a polars
frame with ``lang`` and ``label`` (1 = toxic / harmful, 0 = benign) and usually ``row_id`` and ``group_id``; ``X`` is
a float array [n, d] in the same row order. Only one layer of one model is in memory at a time.

* :func:`analyse_separation` — the tidy table: one row per (model, lang, layer, metric);
* :func:`alignment_shift` — aligned − base per (lang, layer, metric), and each language relative to English;
* :func:`detox_displacement` — per language, the mean toxic → neutral displacement of parallel detox pairs, its
  norm, and its cosine with the English safety direction, per model;
* :func:`pca_scatter_points` — 2-D PCA coordinates of one layer for the scatter plots.

Bad input never stops the analysis: a language with one class, fewer items than PCA dimensions, NaN/inf vectors,
rows that differ between models or layers, an unreadable layer — each gives rows with status ``skipped`` or
``degraded`` and a message naming the model, language and layer, plus one warning in the log; every other cell is
still computed.
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import Field, field_validator
from torch import Tensor

from raysafe.config import Strict
from raysafe.errors import DataError, RaysafeError
from raysafe.separation.metrics import (
    F64,
    SEPARATION_METRICS,
    MetricValue,
    PCAFit,
    bootstrap_interval,
    cell_metrics,
    fit_pca,
    index_counts,
    metric_unit,
    shrinkage_label,
)

log = logging.getLogger(__name__)

ReadLayer = Callable[[str, int], tuple[pl.DataFrame, np.ndarray]]

#: Columns and types of the tidy tables returned by :func:`analyse_separation` and :func:`detox_displacement`.
TABLE_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "lang": pl.String,
    "layer": pl.Int64,
    "metric": pl.String,
    "value": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "n_pos": pl.Int64,
    "n_neg": pl.Int64,
    "status": pl.String,
    "message": pl.String,
    "pca_fit": pl.String,
    "k": pl.Int64,
    "unit": pl.String,
    "shrinkage": pl.String,
}

#: Columns and types of the table returned by :func:`alignment_shift`.
SHIFT_SCHEMA: dict[str, pl.DataType] = {
    "base_model": pl.String,
    "aligned_model": pl.String,
    "lang": pl.String,
    "layer": pl.Int64,
    "metric": pl.String,
    "base_value": pl.Float64,
    "aligned_value": pl.Float64,
    "shift": pl.Float64,
    "shift_ci_low": pl.Float64,
    "shift_ci_high": pl.Float64,
    "base_ratio_en": pl.Float64,
    "aligned_ratio_en": pl.Float64,
    "shift_ratio_en": pl.Float64,
    "shift_diff_en": pl.Float64,
    "unit": pl.String,
    "status": pl.String,
    "message": pl.String,
}

#: Metrics of :func:`detox_displacement`.
DETOX_METRICS: tuple[str, ...] = (
    "detox_mean_norm",
    "detox_pair_norm",
    "detox_consistency",
    "detox_cos_en",
    "detox_proj_en",
    "detox_cos_own",
)

#: Columns of the table returned by :func:`pca_scatter_points`.
SCATTER_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "layer": pl.Int64,
    "lang": pl.String,
    "label": pl.Int64,
    "pc1": pl.Float64,
    "pc2": pl.Float64,
    "ev1": pl.Float64,
    "ev2": pl.Float64,
}

_READ_ERRORS = (RaysafeError, LookupError, ValueError, OSError)


class SeparationOptions(Strict):
    """Options of the separation analysis (docs/separation.md explains each)."""

    k: int = Field(10, ge=1, description="principal components the metrics are computed on")
    pca_fit: Literal["pooled", "per_language"] = Field(
        "pooled", description="fit the PCA on all languages of a model/layer together, or on each language"
    )
    pca_solver: Literal["auto", "covariance", "gram", "randomized"] = "auto"
    shrinkage: Literal["ledoit_wolf"] | float = Field(
        0.0,
        description="covariance shrinkage of the Bhattacharyya Gaussians: 0 = none, the plain closed form (the "
        "paper); ledoit_wolf or a fixed α in (0, 1] as options, named in the table's `shrinkage` column",
    )
    metrics: list[str] = Field(default_factory=lambda: list(SEPARATION_METRICS))
    bootstrap: int = Field(200, ge=0, description="stratified bootstrap resamples per cell (0: no intervals)")
    ci_level: float = Field(0.95, gt=0, lt=1)
    ci_method: Literal["percentile", "bc"] = "percentile"
    seed: int = 0
    probe_folds: int = Field(5, ge=2)
    probe_C: float = Field(1.0, gt=0, description="inverse L2 strength of the probe (scikit-learn's C)")
    probe_space: Literal["pca", "full"] = "pca"
    languages: list[str] | None = Field(None, description="analyse only these languages (default: all present)")
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")
    chunk_rows: int = Field(2048, ge=16, description="row block of the pairwise-distance and PCA passes")

    @field_validator("shrinkage")
    @classmethod
    def _alpha_range(cls, v):
        if not isinstance(v, str) and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"a fixed shrinkage α lies in [0, 1], got {v}")
        return v

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v):
        bad = [m for m in v if m not in SEPARATION_METRICS]
        if bad:
            raise ValueError(f"unknown metrics {bad}; choose from {list(SEPARATION_METRICS)}")
        if not v:
            raise ValueError("give at least one metric")
        return list(dict.fromkeys(v))


def resolve_device(device: str | None) -> torch.device:
    """The torch device to compute on: ``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cell_seed(seed: int, lang: str, layer: int) -> int:
    """Seed of the bootstrap and probe folds of one (language, layer) cell. It does not depend on the model, so
    base and aligned models resample the same items (a paired design) and results do not depend on run order."""
    return zlib.crc32(f"{seed}|{lang}|{layer}".encode()) & 0x7FFFFFFF


# ===================================================================================== reading and checking
@dataclass
class _Layer:
    """One validated read: kept rows per language, notes per language, and the issue that stopped it if any."""

    X: Tensor | None = None
    lang_rows: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None
    notes: dict[str, list[str]] = field(default_factory=dict)
    fatal: str | None = None


@dataclass
class _Reference:
    """Row identity of the first successful read, to check that every later read holds the same items."""

    model: str
    layer: int
    rows: pl.DataFrame  # row_id (or a stand-in), lang


def _read(read_layer: ReadLayer, model: str, layer: int) -> tuple[pl.DataFrame | None, np.ndarray | None, str | None]:
    """Call ``read_layer``; on a read error return its message instead of raising."""
    try:
        meta, X = read_layer(model, layer)
    except _READ_ERRORS as e:
        what = e.what if isinstance(e, RaysafeError) else f"{type(e).__name__}: {e}"
        return None, None, f"cannot read model {model!r} layer {layer}: {what}"
    return meta, X, None


def _prepare(
    meta: pl.DataFrame,
    X: np.ndarray,
    where: str,
    langs_wanted: list[str] | None,
    device: torch.device,
    ref: _Reference | None,
) -> _Layer:
    """Validate one read (``where`` names it in messages) and split it into the wanted languages that are present:
    drop rows with a label other than 0/1 or a non-finite vector, and note (per language) rows that differ from the
    reference read."""
    X = np.asarray(X)
    if X.ndim != 2:
        return _Layer(fatal=f"{where}: vectors must be 2-D [n, d], got shape {X.shape}")
    if X.shape[0] != meta.height:
        return _Layer(fatal=f"{where}: {meta.height} metadata rows but {X.shape[0]} vectors")
    missing = [c for c in ("lang", "label") if c not in meta.columns]
    if missing:
        return _Layer(fatal=f"{where}: metadata lacks column(s) {missing}")
    lang = _langs(meta)
    lab = meta["label"].cast(pl.Int64, strict=False)
    valid = lab.is_in([0, 1]).fill_null(False).to_numpy()
    label = np.where(valid, lab.fill_null(-1).to_numpy(), -1).astype(np.int64)
    Xt = _as_tensor(X, device)
    if not Xt.dtype.is_floating_point:
        Xt = Xt.to(torch.float32)
    finite = torch.isfinite(Xt).all(dim=1).cpu().numpy()
    present = sorted(set(lang.tolist()))
    langs = [lg for lg in langs_wanted if lg in present] if langs_wanted is not None else present
    out = _Layer(X=Xt, labels=torch.from_numpy(label).to(device))
    id_notes = _row_identity_notes(meta, lang, ref)
    for lg in langs:
        in_lang = lang == lg
        notes: list[str] = list(id_notes.get(lg, []))
        bad_label = int((in_lang & (label < 0)).sum())
        bad_vec = int((in_lang & (label >= 0) & ~finite).sum())
        if bad_label:
            notes.append(f"dropped {bad_label} of {int(in_lang.sum())} rows with a label other than 0/1")
        if bad_vec:
            notes.append(f"dropped {bad_vec} of {int(in_lang.sum())} rows with NaN/inf values")
        keep = np.nonzero(in_lang & (label >= 0) & finite)[0]
        out.lang_rows[lg] = torch.from_numpy(keep).to(device)
        out.notes[lg] = notes
    return out


def _as_tensor(X: np.ndarray, device: torch.device) -> Tensor:
    """``X`` as a tensor on ``device`` without a copy on the CPU when possible (read-only arrays are shared too:
    nothing here writes into the input)."""
    X = np.ascontiguousarray(X)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X).to(device)


def _langs(meta: pl.DataFrame) -> np.ndarray:
    """The ``lang`` column as strings (nulls as ``<null>``)."""
    return meta["lang"].cast(pl.String, strict=False).fill_null("<null>").to_numpy()


def _row_keys(meta: pl.DataFrame, lang: np.ndarray) -> pl.DataFrame:
    """The identity of each row: ``row_id`` if present, else (group_id, label) if present, else its position."""
    if "row_id" in meta.columns:
        key = meta["row_id"].cast(pl.String)
    elif "group_id" in meta.columns:
        key = meta["group_id"].cast(pl.String) + "|" + meta["label"].cast(pl.String)
    else:
        key = pl.Series(np.arange(meta.height)).cast(pl.String)
    return pl.DataFrame({"key": key, "lang": lang})


def _row_identity_notes(meta: pl.DataFrame, lang: np.ndarray, ref: _Reference | None) -> dict[str, list[str]]:
    """Per language, a note when this read's rows differ from the reference read's (ids, count or order)."""
    if ref is None:
        return {}
    rows = _row_keys(meta, lang)
    if rows.equals(ref.rows):
        return {}
    notes: dict[str, list[str]] = {}
    for lg in sorted(set(rows["lang"].to_list()) | set(ref.rows["lang"].to_list())):
        a = rows.filter(pl.col("lang") == lg)["key"]
        b = ref.rows.filter(pl.col("lang") == lg)["key"]
        if a.equals(b):
            continue
        extra = int((~a.is_in(b.implode())).sum())
        gone = int((~b.is_in(a.implode())).sum())
        kind = f"{gone} missing, {extra} extra" if (extra or gone) else "same ids in another order"
        notes[lg] = [
            f"rows differ from model {ref.model!r} layer {ref.layer} ({a.len()} vs {b.len()} rows: {kind}); "
            f"comparisons between the two are not paired"
        ]
    return notes


# ====================================================================================================== driver
def _rows_for(
    model: str,
    lang: str,
    layer: int,
    metrics: Sequence[str],
    status: str,
    message: str,
    pca_fit: str,
    k: int | None,
    n_pos: int | None = None,
    n_neg: int | None = None,
) -> list[dict]:
    """Rows with no value (skipped cells)."""
    return [
        _metric_row(model, lang, layer, m, None, None, None, n_pos, n_neg, status, message, pca_fit, k) for m in metrics
    ]


def _metric_row(
    model: str,
    lang: str,
    layer: int,
    metric: str,
    value: float | None,
    ci_low: float | None,
    ci_high: float | None,
    n_pos: int | None,
    n_neg: int | None,
    status: str,
    message: str,
    pca_fit: str,
    k: int | None,
    **extra,
) -> dict:
    """One row of the metrics table (its columns, in order; ``extra`` columns after them), the message located."""
    return dict(
        model=model,
        lang=lang,
        layer=layer,
        metric=metric,
        value=value,
        ci_low=ci_low,
        ci_high=ci_high,
        n_pos=n_pos,
        n_neg=n_neg,
        status=status,
        message=_located(model, lang, layer, message),
        pca_fit=pca_fit,
        k=k,
        unit=metric_unit(metric),
        **extra,
    )


def _located(model: str, lang: str, layer: int, message: str) -> str:
    """``message`` prefixed with the cell it concerns (empty stays empty)."""
    return f"[model {model!r}, lang {lang!r}, layer {layer}] {message}" if message else ""


def _warn(model: str, lang: str, layer: int, status: str, message: str) -> None:
    """One warning line for a cell that is not ok."""
    log.warning("separation %s: %s", status, _located(model, lang, layer, message))


def analyse_separation(
    read_layer: ReadLayer,
    models: Sequence[str],
    layers: Sequence[int],
    options: SeparationOptions | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """The per-language separation table of ``models`` × ``layers``, streaming one layer of one model at a time.

    For each (model, layer): read the vectors, fit the PCA (on all analysed languages together or on each language,
    ``options.pca_fit``), and for each language compute :data:`~raysafe.separation.metrics.SEPARATION_METRICS`
    (those in ``options.metrics``) with bootstrap intervals. Returns a polars frame with the columns of
    :data:`TABLE_SCHEMA`: model, lang, layer, metric, value, ci_low, ci_high, n_pos (toxic items), n_neg (benign
    items), status (``ok`` | ``degraded`` | ``skipped``), message, pca_fit, k (components used).
    """
    opts = options or SeparationOptions()
    if not models or not layers:
        raise DataError(
            "no models or no layers to analyse",
            where="analyse_separation",
            fix="pass at least one model name and one layer index",
        )
    device = resolve_device(opts.device)
    rows: list[dict] = []
    ref: _Reference | None = None
    known_langs: list[str] = list(opts.languages or [])
    combos = list(product(models, layers))
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="separation", unit="layer")
    for model, layer in it:
        meta, X, err = _read(read_layer, model, layer)
        if err is None:
            lay = _prepare(meta, X, f"model {model!r} layer {layer}", opts.languages, device, ref)
            err = lay.fatal
        if err is not None:
            for lg in known_langs or ["*"]:
                _warn(model, lg, layer, "skipped", err)
                rows += _rows_for(model, lg, layer, opts.metrics, "skipped", err, opts.pca_fit, None)
            continue
        if ref is None:
            ref = _Reference(model, layer, _row_keys(meta, _langs(meta)))
        del meta, X
        langs = list(lay.lang_rows)
        for lg in known_langs:
            if lg not in langs:
                msg = f"language {lg!r} absent from model {model!r} layer {layer}"
                _warn(model, lg, layer, "skipped", msg)
                rows += _rows_for(model, lg, layer, opts.metrics, "skipped", msg, opts.pca_fit, None)
        known_langs += [lg for lg in langs if lg not in known_langs]
        rows += _analyse_layer(lay, model, layer, opts)
        del lay
    return pl.DataFrame(rows, schema=TABLE_SCHEMA) if rows else pl.DataFrame(schema=TABLE_SCHEMA)


def _analyse_layer(lay: _Layer, model: str, layer: int, opts: SeparationOptions) -> list[dict]:
    """All cells of one (model, layer): the PCA fit(s) and :func:`cell_metrics` per language."""
    assert lay.X is not None and lay.labels is not None
    rows: list[dict] = []
    pooled = None
    pooled_note = ""
    if opts.pca_fit == "pooled":
        all_rows = torch.cat(list(lay.lang_rows.values())) if lay.lang_rows else torch.empty(0, dtype=torch.long)
        if all_rows.numel() < 2:
            msg = f"only {all_rows.numel()} usable rows in model {model!r} layer {layer}: nothing to fit a PCA on"
            for lg in lay.lang_rows:
                _warn(model, lg, layer, "skipped", msg)
                rows += _rows_for(model, lg, layer, opts.metrics, "skipped", msg, opts.pca_fit, None)
            return rows
        Xp = lay.X if all_rows.numel() == lay.X.shape[0] else lay.X[all_rows]
        pooled = fit_pca(Xp, opts.k, solver=opts.pca_solver, chunk_rows=max(opts.chunk_rows, 4096), seed=opts.seed)
        del Xp
        if pooled.k < opts.k:
            pooled_note = (
                f"PCA keeps {pooled.k} instead of {opts.k} components "
                f"({all_rows.numel()} items, {lay.X.shape[1]} dimensions)"
            )
    for lg, idx in lay.lang_rows.items():
        y = lay.labels[idx]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        notes = list(lay.notes[lg])
        Xl = lay.X[idx]
        if pooled is not None:
            fit = pooled
            if pooled_note:
                notes.append(pooled_note)
        else:
            if idx.numel() < 2:
                msg = "; ".join(notes + [f"only {idx.numel()} usable items: no PCA"])
                _warn(model, lg, layer, "skipped", msg)
                rows += _rows_for(model, lg, layer, opts.metrics, "skipped", msg, opts.pca_fit, None, n_pos, n_neg)
                continue
            fit = fit_pca(Xl, opts.k, solver=opts.pca_solver, chunk_rows=max(opts.chunk_rows, 4096), seed=opts.seed)
            if fit.k < opts.k:
                notes.append(f"PCA keeps {fit.k} instead of {opts.k} components ({idx.numel()} items)")
        Z = fit.transform(Xl)
        res = cell_metrics(
            Z,
            y,
            X=Xl,
            metrics=opts.metrics,
            shrinkage=opts.shrinkage,
            bootstrap=opts.bootstrap,
            ci_level=opts.ci_level,
            ci_method=opts.ci_method,
            seed=cell_seed(opts.seed, lg, layer),
            probe_folds=opts.probe_folds,
            probe_C=opts.probe_C,
            probe_on=opts.probe_space,
            chunk_rows=opts.chunk_rows,
        )
        rows += _cell_rows(res, model, lg, layer, notes, n_pos, n_neg, fit.k, opts)
        del Xl, Z
    return rows


def _cell_rows(
    res: dict[str, MetricValue],
    model: str,
    lg: str,
    layer: int,
    notes: list[str],
    n_pos: int,
    n_neg: int,
    k: int,
    opts: SeparationOptions,
) -> list[dict]:
    """The table rows of one cell's metric values ``res`` (each worsened by the cell-level ``notes``); warns once
    with the worst status."""
    rows: list[dict] = []
    worst = "ok"
    worst_msg = ""
    for m, mv in res.items():
        status, msg = _combine(mv, notes)
        shrinkage = shrinkage_label(opts.shrinkage) if m == "bhattacharyya" else None
        rows.append(
            _metric_row(
                model,
                lg,
                layer,
                m,
                mv.value,
                mv.ci_low,
                mv.ci_high,
                n_pos,
                n_neg,
                status,
                msg,
                opts.pca_fit,
                k,
                shrinkage=shrinkage,
            )
        )
        if _RANK[status] > _RANK[worst]:
            worst, worst_msg = status, msg
    if worst != "ok":
        _warn(model, lg, layer, worst, worst_msg)
    return rows


_RANK = {"ok": 0, "degraded": 1, "skipped": 2}


def _combine(mv: MetricValue, notes: list[str]) -> tuple[str, str]:
    """Status and message of one metric row: the metric's own, worsened to ``degraded`` by cell-level notes."""
    msgs = [*notes, mv.message] if mv.message else list(notes)
    status = mv.status
    if status == "ok" and notes:
        status = "degraded"
    return status, "; ".join(msgs)


# ============================================================================================== alignment shift
def alignment_shift(table: pl.DataFrame, base: str, aligned: str, english: str = "en") -> pl.DataFrame:
    """Aligned − base per (lang, layer, metric) of a tidy table, with each language relative to English.

    Columns (:data:`SHIFT_SCHEMA`): base_model, aligned_model, lang, layer, metric, base_value, aligned_value,
    shift = aligned − base, shift_ci_low/high (± z·√(se_b² + se_a²) with each se read off its interval —
    conservative, as it ignores the pairing of the two models), base_ratio_en and aligned_ratio_en (value / English
    value at the same layer and metric), shift_ratio_en (shift / English shift), shift_diff_en (shift − English
    shift), status and message. Ratios are null where the English value is ~0 or missing. A cell missing or skipped
    on either side is ``skipped``; degraded on either side, or with different item counts, ``degraded``.
    """
    models = set(table["model"].unique().to_list()) if table.height else set()
    for m in (base, aligned):
        if m not in models:
            raise DataError(
                f"model {m!r} is not in the separation table",
                where="alignment_shift",
                fix=f"use one of {sorted(models)}",
            )
    keys = ["lang", "layer", "metric"]
    cols = keys + ["value", "ci_low", "ci_high", "n_pos", "n_neg", "status", "message"]
    b = table.filter(pl.col("model") == base).select(cols).unique(keys, keep="first")
    a = table.filter(pl.col("model") == aligned).select(cols).unique(keys, keep="first")
    j = b.join(a, on=keys, how="full", suffix="_a", coalesce=True)
    z = float(torch.special.ndtri(torch.tensor(0.975, dtype=F64)))
    out_rows = [_shift_row(r, base, aligned, z) for r in j.iter_rows(named=True)]
    if not out_rows:
        return pl.DataFrame(schema=SHIFT_SCHEMA)
    df = pl.DataFrame(
        out_rows, schema={k: v for k, v in SHIFT_SCHEMA.items() if "ratio_en" not in k and k != "shift_diff_en"}
    )
    df = _with_english_ratios(df, english)
    order = {m: i for i, m in enumerate(dict.fromkeys(table["metric"].to_list()))}
    df = df.with_columns(pl.col("metric").replace_strict(order, return_dtype=pl.Int64).alias("_order"))
    return df.sort(["_order", "lang", "layer"]).select(list(SHIFT_SCHEMA)).cast(SHIFT_SCHEMA)


def _shift_row(r: dict, base: str, aligned: str, z: float) -> dict:
    """One row of :func:`alignment_shift` (without the ratios to English) from a joined base/aligned row ``r``
    (aligned columns suffixed ``_a``); ``z`` is the normal quantile of the 95% interval."""
    status, msgs = "ok", []
    for side, st, msg, name in (
        ("base", r["status"], r["message"], base),
        ("aligned", r["status_a"], r["message_a"], aligned),
    ):
        if st is None:
            status = "skipped"
            msgs.append(f"no {side} ({name!r}) row")
        elif st != "ok":
            status = max(status, st, key=_RANK.__getitem__)
            msgs.append(f"{side}: {msg}")
    if r["n_pos"] is not None and r["n_pos_a"] is not None and (r["n_pos"], r["n_neg"]) != (r["n_pos_a"], r["n_neg_a"]):
        status = max(status, "degraded", key=_RANK.__getitem__)
        msgs.append(
            f"different item counts: base {r['n_pos']} toxic / {r['n_neg']} benign, aligned "
            f"{r['n_pos_a']} / {r['n_neg_a']}"
        )
    bv, av = r["value"], r["value_a"]
    shift = av - bv if (bv is not None and av is not None) else None
    lo = hi = None
    if shift is not None and None not in (r["ci_low"], r["ci_high"], r["ci_low_a"], r["ci_high_a"]):
        se = math.hypot((r["ci_high"] - r["ci_low"]) / (2 * z), (r["ci_high_a"] - r["ci_low_a"]) / (2 * z))
        lo, hi = shift - z * se, shift + z * se
    if shift is None and status == "ok":
        status = "skipped"
        msgs.append("no value on one side")
    return dict(
        base_model=base,
        aligned_model=aligned,
        lang=r["lang"],
        layer=r["layer"],
        metric=r["metric"],
        base_value=bv,
        aligned_value=av,
        shift=shift,
        shift_ci_low=lo,
        shift_ci_high=hi,
        unit=metric_unit(r["metric"]),
        status=status,
        message="; ".join(msgs),
    )


def _with_english_ratios(df: pl.DataFrame, english: str) -> pl.DataFrame:
    """``df`` with each language's base, aligned and shift values relative to English at the same layer and
    metric (``*_ratio_en``, ``shift_diff_en``)."""
    en = df.filter(pl.col("lang") == english).select(
        "layer",
        "metric",
        pl.col("base_value").alias("_b_en"),
        pl.col("aligned_value").alias("_a_en"),
        pl.col("shift").alias("_s_en"),
    )
    df = df.join(en, on=["layer", "metric"], how="left")

    def ratio(num: str, den: str) -> pl.Expr:
        return pl.when(pl.col(den).abs() > 1e-12).then(pl.col(num) / pl.col(den)).otherwise(None)

    return df.with_columns(
        ratio("base_value", "_b_en").alias("base_ratio_en"),
        ratio("aligned_value", "_a_en").alias("aligned_ratio_en"),
        ratio("shift", "_s_en").alias("shift_ratio_en"),
        (pl.col("shift") - pl.col("_s_en")).alias("shift_diff_en"),
    )


# ============================================================================================ detox displacement
def _directions(
    meta: pl.DataFrame, X: np.ndarray, device: torch.device, where: str
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Per language of a safety set, the safety direction mean(benign) − mean(toxic) in float64 (it points from
    toxic to non-toxic, like a detox displacement), and a note for each language where it cannot be formed."""
    lay = _prepare(meta, X, f"the safety set of {where}", None, device, None)
    dirs: dict[str, Tensor] = {}
    notes: dict[str, str] = {}
    if lay.fatal:
        return dirs, {"*": lay.fatal}
    for lg, idx in lay.lang_rows.items():
        y = lay.labels[idx]
        x = lay.X[idx]
        if int((y == 1).sum()) == 0 or int((y == 0).sum()) == 0:
            notes[lg] = f"the safety set of {where} has only one class in {lg!r}"
            continue
        dirs[lg] = x[y == 0].to(F64).mean(0) - x[y == 1].to(F64).mean(0)
    return dirs, notes


def _pairs(meta: pl.DataFrame, lang: np.ndarray, keep: np.ndarray, lg: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Row indices of matched (toxic, neutral) pairs of language ``lg`` (matched by group_id), and notes on rows that
    could not be paired."""
    df = pl.DataFrame(
        {
            "i": np.arange(meta.height),
            "g": meta["group_id"].cast(pl.String),
            "label": meta["label"].cast(pl.Int64, strict=False),
            "lang": lang,
            "keep": keep,
        }
    )
    df = df.filter((pl.col("lang") == lg) & pl.col("keep"))
    tox = df.filter(pl.col("label") == 1)
    neu = df.filter(pl.col("label") == 0)
    notes = []
    dups = tox.height - tox["g"].n_unique() + neu.height - neu["g"].n_unique()
    if dups:
        notes.append(f"{dups} repeated (group_id, label) rows: kept the first of each")
    tox, neu = tox.unique("g", keep="first", maintain_order=True), neu.unique("g", keep="first", maintain_order=True)
    pairs = tox.join(neu, on="g", how="inner", suffix="_n").sort("i")
    lone = tox.height + neu.height - 2 * pairs.height
    if lone:
        notes.append(f"{lone} sentences without their pair dropped")
    return pairs["i"].to_numpy(), pairs["i_n"].to_numpy(), notes


def detox_displacement(
    read_layer_detox: ReadLayer,
    read_layer_safety: ReadLayer,
    models: Sequence[str],
    layers: Sequence[int],
    english: str = "en",
    *,
    options: SeparationOptions | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Per (model, language, layer), how parallel detoxification moves hidden states, and whether it moves them
    along the English safety direction.

    Detox pairs are two rows sharing (group_id, lang): label 1 the toxic sentence, 0 its neutral rewrite. With
    pair displacements vᵢ = x(neutral) − x(toxic), their mean v̄ and the English safety direction
    s = mean(benign) − mean(toxic) on the English rows of the safety set (same model and layer), the metrics are
    ``detox_mean_norm`` ‖v̄‖, ``detox_pair_norm`` mean ‖vᵢ‖, ``detox_consistency`` ‖v̄‖ / mean ‖vᵢ‖ (1 = all pairs move
    the same way), ``detox_cos_en`` cos(v̄, s), ``detox_proj_en`` v̄·s/‖s‖, ``detox_cos_own`` cos(v̄, s_lang) with the
    language's own safety direction. Intervals: bootstrap over pairs (``options.bootstrap``), directions held fixed.
    Returns the columns of :data:`TABLE_SCHEMA` (n_pos = n_neg = matched pairs, pca_fit ``none``, k null).
    """
    opts = options or SeparationOptions()
    device = resolve_device(opts.device)
    rows: list[dict] = []
    combos = list(product(models, layers))
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="detox displacement", unit="layer")
    known: list[str] = list(opts.languages or [])
    for model, layer in it:
        rows += _detox_layer(read_layer_detox, read_layer_safety, model, layer, english, opts, device, known)
    return pl.DataFrame(rows, schema=TABLE_SCHEMA) if rows else pl.DataFrame(schema=TABLE_SCHEMA)


def _detox_layer(
    read_detox: ReadLayer,
    read_safety: ReadLayer,
    model: str,
    layer: int,
    english: str,
    opts: SeparationOptions,
    device: torch.device,
    known: list[str],
) -> list[dict]:
    """All languages of one (model, layer) of :func:`detox_displacement`."""
    rows: list[dict] = []

    def skip_all(msg: str, langs: list[str]) -> None:
        for lg in langs or ["*"]:
            _warn(model, lg, layer, "skipped", msg)
            rows.extend(_rows_for(model, lg, layer, DETOX_METRICS, "skipped", msg, "none", None))

    dirs, dir_notes = _safety_directions(read_safety, model, layer, device)
    meta, X, err = _read(read_detox, model, layer)
    if err is None and "group_id" not in meta.columns:
        err = f"detox pairs of model {model!r} layer {layer} lack the group_id column"
    lay = None
    if err is None:
        lay = _prepare(meta, X, f"detox pairs of model {model!r} layer {layer}", opts.languages, device, None)
        err = lay.fatal
    if err is not None:
        skip_all(err, known)
        return rows
    known += [lg for lg in lay.lang_rows if lg not in known]
    lang_arr = _langs(meta)
    for lg in known:
        if lg not in lay.lang_rows:
            msg = f"language {lg!r} absent from the detox pairs of model {model!r} layer {layer}"
            _warn(model, lg, layer, "skipped", msg)
            rows += _rows_for(model, lg, layer, DETOX_METRICS, "skipped", msg, "none", None)
    keep_mask = np.zeros(meta.height, dtype=bool)
    for idx in lay.lang_rows.values():
        keep_mask[idx.cpu().numpy()] = True
    d_en = dirs.get(english)
    en_note = (
        dir_notes.get(english)
        or dir_notes.get("*")
        or (f"no English ({english!r}) rows in the safety set of model {model!r} layer {layer}")
    )
    for lg in lay.lang_rows:
        ti, ni, notes = _pairs(meta, lang_arr, keep_mask, lg)
        notes = lay.notes[lg] + notes
        own_note = dir_notes.get(lg) or dir_notes.get("*") or f"no {lg!r} rows in the safety set"
        rows += _detox_language(
            model, lg, layer, lay.X, ti, ni, notes, d_en, dirs.get(lg), en_note, own_note, opts, device
        )
    return rows


def _safety_directions(
    read_safety: ReadLayer, model: str, layer: int, device: torch.device
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The per-language safety directions of one (model, layer) from the safety set, and a note per language
    (``"*"``: all) that has none."""
    smeta, sX, err = _read(read_safety, model, layer)
    dirs: dict[str, Tensor] = {}
    dir_notes: dict[str, str] = {}
    if err is not None:
        dir_notes["*"] = f"safety set: {err}"
    else:
        dirs, dir_notes = _directions(smeta, sX, device, f"model {model!r} layer {layer}")
    del smeta, sX
    return dirs, dir_notes


def _detox_language(
    model: str,
    lg: str,
    layer: int,
    X: Tensor,
    ti: np.ndarray,
    ni: np.ndarray,
    notes: list[str],
    d_en: Tensor | None,
    own: Tensor | None,
    en_note: str,
    own_note: str,
    opts: SeparationOptions,
    device: torch.device,
) -> list[dict]:
    """The detox metric rows of one language from its toxic rows ``ti`` and paired neutral rows ``ni``."""
    m = len(ti)
    if m == 0:
        msg = "; ".join(notes + ["no complete toxic/neutral pair"])
        _warn(model, lg, layer, "skipped", msg)
        return _rows_for(model, lg, layer, DETOX_METRICS, "skipped", msg, "none", None, 0, 0)
    tox_rows = torch.as_tensor(ti.copy(), device=device)
    neu_rows = torch.as_tensor(ni.copy(), device=device)
    V = X[neu_rows].to(F64) - X[tox_rows].to(F64)
    vals = _detox_values(V, d_en, own, torch.ones(1, m, dtype=F64, device=device))
    reps = None
    if opts.bootstrap > 0 and m >= 2:
        gen = torch.Generator(device="cpu").manual_seed(cell_seed(opts.seed, lg, layer))
        idx = torch.randint(0, m, (opts.bootstrap, m), generator=gen).to(device)
        reps = _detox_values(V, d_en, own, index_counts(idx, m))
    rows: list[dict] = []
    worst, worst_msg = "ok", ""
    for name in DETOX_METRICS:
        why = en_note if name in ("detox_cos_en", "detox_proj_en") else own_note
        row, msg = _detox_metric_row(model, lg, layer, name, vals.get(name), reps, notes, why, m, opts)
        rows.append(row)
        if _RANK[row["status"]] > _RANK[worst]:
            worst, worst_msg = row["status"], msg
    if worst != "ok":
        _warn(model, lg, layer, worst, worst_msg)
    return rows


def _detox_metric_row(
    model: str,
    lg: str,
    layer: int,
    name: str,
    point: Tensor | None,
    reps: dict[str, Tensor] | None,
    notes: list[str],
    why: str,
    m: int,
    opts: SeparationOptions,
) -> tuple[dict, str]:
    """One detox metric's table row (point estimate ``point[0]``, bootstrap interval from ``reps``; skipped with
    ``why`` when the metric has no value) and its message."""
    msgs = list(notes)
    if point is None:
        status, value, lo, hi = "skipped", None, None, None
        msgs.append(why)
    else:
        value = float(point[0])
        lo = hi = None
        if reps is not None:
            lo_f, hi_f, bad = bootstrap_interval(reps[name], value, opts.ci_level, opts.ci_method)
            lo = lo_f if math.isfinite(lo_f) else None
            hi = hi_f if math.isfinite(hi_f) else None
            if bad:
                msgs.append(f"{bad} bootstrap resamples not finite")
        if not math.isfinite(value):
            value, lo, hi = None, None, None
            msgs.append("not finite (zero-length displacement or direction)")
        status = "degraded" if msgs else "ok"
    msg = "; ".join(msgs)
    return _metric_row(model, lg, layer, name, value, lo, hi, m, m, status, msg, "none", None), msg


def _detox_values(V: Tensor, d_en: Tensor | None, d_own: Tensor | None, W: Tensor) -> dict[str, Tensor]:
    """The detox metrics [B] of displacements ``V`` [m, d] under count weights ``W`` [B, m] (all ones: the point
    estimate). Directions of another dimension than ``V`` are ignored (their metrics are left out)."""
    m = V.shape[0]
    mean = W @ V / m  # [B, d]
    mean_norm = torch.linalg.vector_norm(mean, dim=1)
    pair_norm = W @ torch.linalg.vector_norm(V, dim=1) / m
    nan = torch.full_like(mean_norm, float("nan"))
    out = {
        "detox_mean_norm": mean_norm,
        "detox_pair_norm": pair_norm,
        "detox_consistency": torch.where(pair_norm > 0, mean_norm / pair_norm.clamp_min(1e-300), nan),
    }

    def cos(d: Tensor) -> Tensor:
        dn = torch.linalg.vector_norm(d)
        c = (mean @ d) / (mean_norm * dn).clamp_min(1e-300)
        return torch.where((mean_norm > 0) & (dn > 0), c, nan)

    if d_en is not None and d_en.shape[0] == V.shape[1]:
        out["detox_cos_en"] = cos(d_en)
        dn = torch.linalg.vector_norm(d_en)
        out["detox_proj_en"] = (mean @ d_en) / dn if float(dn) > 0 else nan
    if d_own is not None and d_own.shape[0] == V.shape[1]:
        out["detox_cos_own"] = cos(d_own)
    return out


# ================================================================================================ scatter data
def pca_scatter_points(
    read_layer: ReadLayer,
    models: Sequence[str],
    layer: int,
    options: SeparationOptions | None = None,
    *,
    max_points_per_class: int = 300,
) -> pl.DataFrame:
    """2-D PCA coordinates of one layer of each model, for the per-language scatter plots.

    The PCA is fitted as ``options.pca_fit`` says (all languages together, or each language). Each component is
    oriented so that the toxic class has the larger mean, and coordinates are divided by the standard deviation
    along PC1 of their fit, so base and aligned models share axes. At most ``max_points_per_class`` items per
    (model, language, class) are kept (a seeded sample). Unreadable models and languages are left out with a
    warning. Columns: :data:`SCATTER_SCHEMA` (ev1, ev2: explained-variance ratios of the two components).
    """
    opts = options or SeparationOptions()
    device = resolve_device(opts.device)
    frames: list[pl.DataFrame] = []
    for model in models:
        meta, X, err = _read(read_layer, model, layer)
        lay = None if err else _prepare(meta, X, f"model {model!r} layer {layer}", opts.languages, device, None)
        err = err or (lay.fatal if lay else None)
        if err:
            log.warning("scatter: %s", err)
            continue
        del meta, X
        groups = {lg: idx for lg, idx in lay.lang_rows.items() if idx.numel() >= 3}
        for lg in set(lay.lang_rows) - set(groups):
            log.warning("scatter: model %r layer %d lang %r: fewer than 3 usable items, left out", model, layer, lg)
        if not groups:
            continue
        fits = {}
        if opts.pca_fit == "pooled":
            allr = torch.cat(list(groups.values()))
            shared = fit_pca(lay.X[allr], 2, solver=opts.pca_solver, seed=opts.seed)
            fits = {lg: (shared, allr) for lg in groups}
        else:
            fits = {
                lg: (fit_pca(lay.X[idx], 2, solver=opts.pca_solver, seed=opts.seed), idx) for lg, idx in groups.items()
            }
        for lg, idx in groups.items():
            fit, orient_rows = fits[lg]
            frames.append(_scatter_frame(lay, fit, orient_rows, idx, model, lg, layer, max_points_per_class, opts))
    return pl.concat(frames) if frames else pl.DataFrame(schema=SCATTER_SCHEMA)


def _scatter_frame(
    lay: _Layer,
    fit: PCAFit,
    orient_rows: Tensor,
    idx: Tensor,
    model: str,
    lg: str,
    layer: int,
    max_points_per_class: int,
    opts: SeparationOptions,
) -> pl.DataFrame:
    """The scatter points of one (model, language): a seeded sample of its rows ``idx`` projected on ``fit``,
    oriented on ``orient_rows`` and scaled by the standard deviation along PC1."""
    sign = _orientation(fit.transform(lay.X[orient_rows]), lay.labels[orient_rows])
    scale = math.sqrt(float(fit.explained_variance[0])) or 1.0
    keep = _subsample(lay.labels[idx], max_points_per_class, cell_seed(opts.seed, lg, layer))
    rows_i = idx[keep]
    Z = (fit.transform(lay.X[rows_i]) * sign / scale).cpu().numpy()
    if Z.shape[1] < 2:
        Z = np.concatenate([Z, np.zeros((Z.shape[0], 1))], axis=1)
    ev = fit.explained_variance_ratio.cpu().numpy().tolist() + [0.0]
    return pl.DataFrame(
        {
            "model": model,
            "layer": layer,
            "lang": lg,
            "label": lay.labels[rows_i].cpu().numpy(),
            "pc1": Z[:, 0],
            "pc2": Z[:, 1],
            "ev1": ev[0],
            "ev2": ev[1],
        },
        schema=SCATTER_SCHEMA,
    )


def _orientation(Z: Tensor, y: Tensor) -> Tensor:
    """±1 per component so that the toxic class mean is not below the benign one."""
    y = y.to(Z.device)
    if int((y == 1).sum()) == 0 or int((y == 0).sum()) == 0:
        return torch.ones(Z.shape[1], dtype=F64, device=Z.device)
    diff = Z[y == 1].mean(0) - Z[y == 0].mean(0)
    return torch.where(diff < 0, -1.0, 1.0).to(F64)


def _subsample(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Positions of at most ``per_class`` items of each class of ``y`` (seeded, in original order)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    y_cpu = y.cpu()
    picks = []
    for c in (0, 1):
        pos = torch.nonzero(y_cpu == c).flatten()
        if pos.numel() > per_class:
            pos = pos[torch.randperm(pos.numel(), generator=gen)[:per_class]]
        picks.append(pos)
    return torch.sort(torch.cat(picks)).values.to(y.device)
