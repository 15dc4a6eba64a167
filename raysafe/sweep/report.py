"""What a finished sweep leaves behind: the results table (polars → Parquet + CSV), the Pareto plot, the best config.

One row per trial: its id and status, its searched params, every final metric (or, for a trial the scheduler
stopped, its last intermediate ones), ``objective``/``feasible``/``pareto``/``best``, its checkpoint and run ids.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl

from raysafe.config import dump_config
from raysafe.sweep.objective import ObjectiveSpec, best_index, pareto_front
from raysafe.train.config import TrainConfig

FIRST_COLUMNS = ("trial_id", "status", "objective", "feasible", "pareto", "best")


def results_table(rows: list[dict[str, Any]], objective: ObjectiveSpec, param_keys: list[str]) -> pl.DataFrame:
    """Rows (trial_id, status, params..., metrics..., paths) → the table with pareto/best flags, sorted by objective.

    Only evaluated trials (status ``finished``) take part in the front and the best pick.
    """
    done = [r for r in rows if r.get("status") == "finished"]
    front = {id(done[i]) for i in pareto_front(done, objective.pareto)}
    b = best_index(done, objective)
    best_id = id(done[b]) if b is not None else None
    out = []
    for r in rows:
        rr = dict(r)
        rr["pareto"] = id(r) in front
        rr["best"] = id(r) == best_id
        out.append(rr)
    if not out:
        return pl.DataFrame()
    df = pl.DataFrame(out, infer_schema_length=None, strict=False)
    metric_cols = sorted(
        c
        for c in df.columns
        if c not in (*FIRST_COLUMNS, *param_keys)
        and c not in ("checkpoint_dir", "model_dir", "mlflow_run_id", "error", "violations")
    )
    tail = [c for c in ("violations", "error", "checkpoint_dir", "model_dir", "mlflow_run_id") if c in df.columns]
    order = (
        [c for c in FIRST_COLUMNS if c in df.columns] + [k for k in param_keys if k in df.columns] + metric_cols + tail
    )
    df = df.select(order)
    if "objective" in df.columns:
        df = df.sort("objective", descending=True, nulls_last=True)
    return df


def _pareto_panel(ax, done: pl.DataFrame, x, y, param_keys: list[str] | None) -> None:
    """One panel: the finished trials over metric ``x`` against ``y``, the Pareto front joined, the best starred,
    points labelled by trial id and searched values."""
    keys = [k for k in (param_keys or []) if k in done.columns]
    label = pl.concat_str(
        [pl.col("trial_id").str.slice(-5)] + [pl.lit(f" {k}=") + pl.col(k).cast(pl.String) for k in keys]
    ).alias("_label")
    pts = (
        done.with_columns(label)
        .select("_label", x.metric, y.metric, "pareto", "best")
        .drop_nans(subset=[x.metric, y.metric])
        .drop_nulls(subset=[x.metric, y.metric])
    )
    xs, ys = pts[x.metric].to_list(), pts[y.metric].to_list()
    ax.scatter(xs, ys, c="#9aa5b1", s=36, label="trials", zorder=2)
    fr = pts.filter(pl.col("pareto")).sort(x.metric)
    if fr.height:
        ax.plot(
            fr[x.metric].to_list(),
            fr[y.metric].to_list(),
            "-o",
            c="#c0392b",
            ms=7,
            lw=1.4,
            label="Pareto front (all objectives)",
            zorder=3,
        )
    bst = pts.filter(pl.col("best"))
    if bst.height:
        ax.scatter(
            bst[x.metric].to_list(),
            bst[y.metric].to_list(),
            marker="*",
            s=260,
            c="#f1c40f",
            edgecolors="k",
            label="best (score, constraints)",
            zorder=4,
        )
    for (xv, yv), texts in _coincident_labels(pts["_label"].to_list(), xs, ys).items():
        ax.annotate("\n".join(texts), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=6, va="bottom")
    ax.margins(x=0.12, y=0.18)  # room for the labels at the edges
    ax.legend(fontsize=7, loc="best")


def pareto_plot(
    df: pl.DataFrame, objective: ObjectiveSpec, path: Path, title: str, param_keys: list[str] | None = None
) -> Path:
    """Scatter of the evaluated trials over the first Pareto metric against each other one (one panel per pair),
    the front highlighted and joined, the best trial starred, points labelled by trial id and searched values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = objective.pareto[0]
    others = objective.pareto[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5.2 * len(others), 4.4), squeeze=False)
    done = df.filter(pl.col("status") == "finished") if df.height else df
    for ax, x in zip(axes[0], others):
        if done.height == 0 or x.metric not in done.columns or y.metric not in done.columns:
            ax.text(0.5, 0.5, "no evaluated trial", ha="center", va="center", transform=ax.transAxes)
        else:
            _pareto_panel(ax, done, x, y, param_keys)
        ax.set_xlabel(f"{x.metric} ({'higher' if x.mode == 'max' else 'lower'} is better)")
        ax.set_ylabel(f"{y.metric} ({'higher' if y.mode == 'max' else 'lower'} is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _coincident_labels(
    labels: list[str], xs: list[float], ys: list[float], tol: float = 0.03
) -> dict[tuple[float, float], list[str]]:
    """Labels of trials that land on (nearly) the same point — within ``tol`` of the axis ranges, e.g. λ = 0 trials,
    which the mixture does not change — stacked in one annotation instead of printed over each other."""
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    out: dict[tuple[float, float], list[str]] = {}
    for text, xv, yv in zip(labels, xs, ys):
        near = next((k for k in out if abs(k[0] - xv) <= tol * span_x and abs(k[1] - yv) <= tol * span_y), None)
        out.setdefault(near or (xv, yv), []).append(text)
    return out


def best_train_config(trial_cfg: TrainConfig, name: str, storage_path: str, tracking: dict) -> str:
    """The best trial's TrainConfig as YAML for ``raysafe train``: a fresh run name, the base config's storage path
    and tracking (the trial's own run directory is finished: re-using its name would only resume it)."""
    tree = trial_cfg.model_dump(mode="json")
    tree["checkpoint"]["name"] = name
    tree["checkpoint"]["storage_path"] = storage_path
    tree["tracking"] = tracking
    cfg = TrainConfig.model_validate(tree)
    return dump_config(cfg)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
