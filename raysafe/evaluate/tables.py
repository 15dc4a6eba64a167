"""Metrics tables from judgements and utility scores (the arithmetic lives in ``raysafe.evaluate.metrics``).

- ``per_language``: one row per (model, judge, set, lang) — prompts, harmful prompts, safe / unsafe / unparsed
  judgements, empty generations, the set's metric (safety rate or attack success rate) with its bootstrap
  interval, the over-refusal rate on harmless prompts, and a status (``ok``, ``no prompts``,
  ``no parsed judgements``). Every expected language has a row, with or without prompts.
- ``summary``: one row per (model, judge, set) — mean over languages, variance across languages in pp² (the MLC
  paper's unit; beside it the same variance in fraction² and the standard deviation in pp, and the ddof used),
  pairwise cross-language agreement, each with its interval; totals of unparsed judgements and empty generations; the
  languages without prompts; the model's mean multiple-choice accuracy.
- ``agreement_pairs``: one row per (model, judge, set, language pair).
- ``utility``: one row per (model, lang) — questions, accuracy and interval (``no questions`` where none).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from raysafe.errors import OutputError
from raysafe.evaluate import metrics as M
from raysafe.evaluate.config import MetricsSpec

PER_LANGUAGE_SCHEMA = {
    "model": pl.String,
    "judge": pl.String,
    "set": pl.String,
    "metric": pl.String,
    "lang": pl.String,
    "status": pl.String,
    "n_prompts": pl.Int64,
    "n_harmful": pl.Int64,
    "n_safe": pl.Int64,
    "n_unsafe": pl.Int64,
    "n_unparsed": pl.Int64,
    "n_empty": pl.Int64,
    "value": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "safety_rate": pl.Float64,
    "over_refusal_rate": pl.Float64,
    "n_harmless": pl.Int64,
}


def _flip(metric: str, v: float) -> float:
    return 1.0 - v if metric == "attack_success_rate" and not math.isnan(v) else v


def _interval(metric: str, lo: float, hi: float) -> tuple[float, float]:
    return (_flip(metric, hi), _flip(metric, lo)) if metric == "attack_success_rate" else (lo, hi)


def safety_tables(
    prompts: pl.DataFrame, judgements: pl.DataFrame, model: str, judge: str, langs: list[str], spec: MetricsSpec
) -> tuple[list[dict], list[dict], list[dict]]:
    """(per-language rows, summary rows, agreement-pair rows) of one model and judge, for every set."""
    j = judgements.select("row_id", "verdict", "refusal", "empty")
    data = prompts.join(j, on="row_id", how="left")
    per_lang, summary, pairs_out = [], [], []
    for set_name in data["set"].unique(maintain_order=True).to_list():
        d = data.filter(pl.col("set") == set_name)
        metric = d["metric"][0]
        missing_judgements = d.filter(pl.col("verdict").is_null())
        if missing_judgements.height:
            raise OutputError(
                f"{missing_judgements.height} prompt(s) of set {set_name!r} have no judgement by {judge}",
                where=f"model {model}, judge {judge}, e.g. row_id {missing_judgements['row_id'][0]}",
                fix="re-run the same command: it resumes the missing generation/judgement shards",
            )
        harmful = d.filter(pl.col("harmful"))
        groups = sorted(harmful["group_id"].unique().to_list())
        cells = {
            (r["lang"], r["group_id"]): (1.0 if r["verdict"] == "safe" else 0.0)
            for r in harmful.iter_rows(named=True)
            if r["verdict"] in ("safe", "unsafe") and r["lang"] in langs
        }
        X = M.outcome_matrix(langs, groups, cells)
        st = M.group_statistics(
            X, n_boot=spec.bootstrap, seed=spec.seed, confidence=spec.confidence, ddof=spec.variance_ddof
        )
        present = set(d["lang"].unique().to_list())
        for i, lang in enumerate(langs):
            dl = d.filter(pl.col("lang") == lang)
            hl = dl.filter(pl.col("harmful"))
            nl = dl.filter(~pl.col("harmful") & pl.col("refusal").is_not_null())
            n_safe = int((hl["verdict"] == "safe").sum())
            n_unsafe = int((hl["verdict"] == "unsafe").sum())
            rate = float(st["rates"][i])
            lo, hi = _interval(metric, float(st["rates_lo"][i]), float(st["rates_hi"][i]))
            status = "no prompts" if lang not in present else ("ok" if n_safe + n_unsafe else "no parsed judgements")
            per_lang.append(
                {
                    "model": model,
                    "judge": judge,
                    "set": set_name,
                    "metric": metric,
                    "lang": lang,
                    "status": status,
                    "n_prompts": dl.height,
                    "n_harmful": hl.height,
                    "n_safe": n_safe,
                    "n_unsafe": n_unsafe,
                    "n_unparsed": int((dl["verdict"] == "unparsed").sum()),
                    "n_empty": int(dl["empty"].sum()),
                    "value": _flip(metric, rate),
                    "ci_low": lo,
                    "ci_high": hi,
                    "safety_rate": rate,
                    "over_refusal_rate": float(nl["refusal"].mean()) if nl.height else float("nan"),
                    "n_harmless": int((~dl["harmful"]).sum()),
                }
            )
        mean = float(st["mean"])
        mlo, mhi = _interval(metric, *st["mean_ci"])
        summary.append(
            {
                "model": model,
                "judge": judge,
                "set": set_name,
                "metric": metric,
                "n_languages": int(np.sum(~np.isnan(st["rates"]))),
                "languages_without_prompts": ",".join(x for x in langs if x not in present),
                "n_prompts": d.height,
                "n_harmful": harmful.height,
                "n_unparsed": int((d["verdict"] == "unparsed").sum()),
                "n_empty": int(d["empty"].sum()),
                "mean": _flip(metric, mean),
                "mean_ci_low": mlo,
                "mean_ci_high": mhi,
                "variance_pp2": float(st["variance"]),
                "variance_ci_low": float(st["variance_ci"][0]),
                "variance_ci_high": float(st["variance_ci"][1]),
                # the same spread in the other units it is quoted in, side by side (docs/evaluation.md)
                "variance_fraction2": M.pp2_to_fraction2(float(st["variance"])),
                "sd_pp": math.sqrt(st["variance"]) if st["variance"] >= 0 else float("nan"),
                "variance_ddof": spec.variance_ddof,
                "agreement": float(st["agreement"]),
                "agreement_ci_low": float(st["agreement_ci"][0]),
                "agreement_ci_high": float(st["agreement_ci"][1]),
                "n_pairs": int(np.sum(st["n_common"] > 0)),
            }
        )
        for p, (a, b) in enumerate(st["pairs"]):
            pairs_out.append(
                {
                    "model": model,
                    "judge": judge,
                    "set": set_name,
                    "lang_a": langs[a],
                    "lang_b": langs[b],
                    "n_common": int(st["n_common"][p]),
                    "agreement": float(st["pair_agreement"][p]),
                    "ci_low": float(st["pair_lo"][p]),
                    "ci_high": float(st["pair_hi"][p]),
                }
            )
    return per_lang, summary, pairs_out


def utility_table(
    mc: pl.DataFrame, scores: pl.DataFrame, model: str, langs: list[str], spec: MetricsSpec
) -> tuple[list[dict], dict]:
    """(per-language rows, model summary) of multiple-choice accuracy."""
    groups = sorted(mc["group_id"].unique().to_list())
    cells = {
        (r["lang"], r["group_id"]): float(r["correct"]) for r in scores.iter_rows(named=True) if r["lang"] in langs
    }
    X = M.outcome_matrix(langs, groups, cells)
    st = M.group_statistics(
        X, n_boot=spec.bootstrap, seed=spec.seed, confidence=spec.confidence, ddof=spec.variance_ddof
    )
    rows = []
    for i, lang in enumerate(langs):
        n = int(np.sum(~np.isnan(X[i])))
        rows.append(
            {
                "model": model,
                "lang": lang,
                "status": "ok" if n else "no questions",
                "n_questions": n,
                "accuracy": float(st["rates"][i]),
                "ci_low": float(st["rates_lo"][i]),
                "ci_high": float(st["rates_hi"][i]),
                "chance": 0.25,
            }
        )
    return rows, {
        "model": model,
        "utility_accuracy": float(st["mean"]),
        "utility_ci_low": float(st["mean_ci"][0]),
        "utility_ci_high": float(st["mean_ci"][1]),
    }


def frame(rows: list[dict], schema: dict | None = None) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, strict=False) if rows or schema else pl.DataFrame()
