"""A trial's flat metrics dict, from what its stages return: the training state, the evaluation tables, the
held-out consistency, and the base model's evaluation (for deltas).

Names (all floats; the objective, the results table and MLflow use the same names):

- ``train_step`` and ``train_<key>`` for every metric of the training step record, ``/`` → ``_``
  (``train_loss_align``, ``train_loss_total``, ``train_align_rewards_accuracy``, ...);
- ``safety_mean`` (mean safety rate over languages, in [0, 1]), ``safety_variance`` (variance of the per-language
  safety rates across languages, in pp²), ``safety_agreement``, ``safety_<lang>``, ``utility_accuracy`` (mean
  multiple-choice accuracy over languages) — from the evaluation of one set with one judge (an attack-success-rate
  set is turned into safety = 1 − ASR);
- ``utility_drop`` = base utility − trial utility, ``safety_gain`` = trial safety − base safety (need the base
  model's evaluation);
- ``consistency_rank1_energy``, ``consistency_mean_cosine``: held-out cross-lingual consistency of the trained
  policy's hidden states (``raysafe.consistency``);
- ``objective`` (the score, maximised) and ``feasible`` (1 or 0), added by the driver.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import polars as pl

from raysafe.errors import OutputError

#: metrics of the training step record that every alignment loss reports (the ones ASHA may prune on)
ALWAYS_TRAIN = ("train_loss_align", "train_loss_total")
EVAL_METRICS = ("safety_mean", "safety_variance", "safety_agreement", "utility_accuracy")
BASELINE_METRICS = ("utility_drop", "safety_gain")
CONSISTENCY_METRICS = ("consistency_rank1_energy", "consistency_mean_cosine")
TRAIN_METRICS = (
    "train_loss_align",
    "train_loss_total",
    "train_loss_mlc",
    "train_align_rewards_accuracy",
    "train_align_rewards_margins",
    "train_align_rewards_chosen",
    "train_align_rewards_rejected",
    "train_mlc_rank1_energy",
    "train_mlc_cosine_z",
    "train_mlc_cosine_hidden",
    "train_mlc_sigma1",
    "train_lr",
    "train_step_time_s",
    "train_tokens_per_s",
    "train_memory_mb",
)


def train_name(key: str) -> str:
    """``loss/align`` → ``train_loss_align``."""
    return "train_" + re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def train_metrics(step_metrics: Mapping[str, float], step: int) -> dict[str, float]:
    """The training record's metrics of one step under ``train_*`` names, with ``train_step``."""
    out = {
        train_name(k): float(v)
        for k, v in step_metrics.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    out["train_step"] = float(step)
    return out


def eval_metrics(
    per_language: pl.DataFrame, summary: pl.DataFrame, set_name: str | None = None, judge: str | None = None
) -> dict[str, float]:
    """Safety and utility of one evaluated model on one set by one judge (the first of each when not named)."""
    if summary.height == 0:
        raise OutputError(
            "the evaluation produced no summary row",
            where="evaluation",
            fix="check the evaluation's sets and languages",
        )
    set_name = set_name or summary["set"][0]
    judge = judge or summary["judge"][0]
    row = summary.filter((pl.col("set") == set_name) & (pl.col("judge") == judge))
    if row.height == 0:
        raise OutputError(
            f"no evaluation of set {set_name!r} by judge {judge!r}",
            where="evaluation.set / judge",
            fix=f"choose from sets {summary['set'].unique().to_list()} and judges "
            f"{summary['judge'].unique().to_list()}",
        )
    r = row.row(0, named=True)
    flip = r["metric"] == "attack_success_rate"
    mean = float(r["mean"])
    out = {
        "safety_mean": 1.0 - mean if flip and not math.isnan(mean) else mean,
        "safety_variance": float(r["variance_pp2"]),
        "safety_agreement": float(r["agreement"]),
        "utility_accuracy": float(r.get("utility_accuracy", float("nan"))),
    }
    langs = per_language.filter((pl.col("set") == set_name) & (pl.col("judge") == judge))
    for lr in langs.iter_rows(named=True):
        out[f"safety_{lr['lang']}"] = float(lr["safety_rate"])
    return out


def baseline_deltas(trial: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    """``utility_drop`` = base − trial utility; ``safety_gain`` = trial − base safety (NaN propagates)."""
    nan = float("nan")
    return {
        "utility_drop": float(base.get("utility_accuracy", nan)) - float(trial.get("utility_accuracy", nan)),
        "safety_gain": float(trial.get("safety_mean", nan)) - float(base.get("safety_mean", nan)),
    }


def known_metrics(evaluation: bool, baseline: bool, consistency: bool, languages: list[str]) -> set[str]:
    """Every metric name a trial of this configuration reports (for checking the objective before any trial)."""
    names = set(TRAIN_METRICS) | {"train_step"}
    if evaluation:
        names |= set(EVAL_METRICS) | {f"safety_{lang}" for lang in languages}
        if baseline:
            names |= set(BASELINE_METRICS)
    if consistency:
        names |= set(CONSISTENCY_METRICS)
    return names
