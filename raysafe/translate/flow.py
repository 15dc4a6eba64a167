"""The translation flow: source rows → input shards → Ray Data (translator actor pool: translate, round trip, score)
→ per-(language, shard) files → flags → PROMPT_VARIANTS / PREFERENCE_PAIRS contract files, report, figures, MLflow.

``run_translate(cfg)`` is what ``raysafe translate``, ``jobs/translate.py`` and the tests call. It is resumable: cells
(language × input shard) already marked done are skipped, so a re-run after a kill translates only what is missing.
The output directory carries its identity (source rows, translator weights and settings, scoring): a re-run with any
of them different refuses, naming the fields. Flags are recomputed from the stored scores on every run, so a change of
threshold re-flags without translating again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_bytes, atomic_write_json, atomic_write_parquet
from raysafe.config import dump_config
from raysafe.data import schemas
from raysafe.data.sources import load_table
from raysafe.errors import DataError, OutputError, remote_errors
from raysafe.identity import fingerprint
from raysafe.translate.config import TranslateConfig
from raysafe.translate.report import (
    flag,
    flag_identical_answers,
    language_report,
    pairs_table,
    quality_figures,
    variants_table,
)
from raysafe.translate.store import TranslationStore

log = logging.getLogger(__name__)

FIELDS = {"prompt_variants": ["text"], "preference_pairs": ["prompt", "chosen", "rejected"]}


@dataclass
class TranslateResult:
    output_dir: Path
    contract: str
    dataset_fingerprint: str
    cells_total: int
    cells_translated: int
    sentences: int
    seconds: float
    report: pl.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    @property
    def sentences_per_s(self) -> float:
        return self.sentences / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"translations in {self.output_dir} ({self.contract}, source {self.dataset_fingerprint}): "
            f"{self.cells_translated}/{self.cells_total} (language x shard) cells translated now, "
            f"{self.sentences:,} sentences, {self.sentences_per_s:,.1f} sentences/s"
        ]
        for r in self.report.iter_rows(named=True):
            lines.append(
                f"  {r['lang']}: {r['kept']}/{r['translated']} kept, {r['flagged']} flagged "
                f"(round-trip chrF median {'n/a' if r['chrf_median'] is None else format(r['chrf_median'], '.1f')})"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {name}: {p}" for name, p in self.files.items()]
        if self.mlflow_run_id:
            lines.append(f"MLflow run {self.mlflow_run_id}")
        return "\n".join(lines)


def contract_of(cfg: TranslateConfig) -> str:
    if cfg.translate.contract != "auto":
        return cfg.translate.contract
    if cfg.data.kind == "fixture" and cfg.data.name == "preference_pairs":
        return "preference_pairs"
    return "prompt_variants"


def source_rows(cfg: TranslateConfig, contract: str) -> pl.DataFrame:
    """The validated rows to translate: those in ``translate.source_lang`` (pairs without a lang column: all), one
    per ``group_id``."""
    schema = schemas.PREFERENCE_PAIRS if contract == "preference_pairs" else schemas.PROMPT_VARIANTS
    rows = load_table(cfg.data, schema)
    src = cfg.translate.source_lang
    if "lang" in rows.columns:
        have = sorted(set(rows["lang"].to_list()))
        rows = rows.filter(pl.col("lang") == src)
        if rows.height == 0:
            raise DataError(
                f"the source has no rows in translate.source_lang={src!r} (it has {have})",
                where=f"data ({cfg.data.name or cfg.data.path})",
                fix="set translate.source_lang to one of those, or filter the source differently",
            )
    dup = rows.filter(pl.col("group_id").is_duplicated())
    if dup.height:
        raise DataError(
            f"{dup.height} source rows in {src!r} share a group_id; each item must be one row so that its "
            "translations share its id",
            where=f"group_id(s) {sorted(set(dup['group_id'].to_list()))[:5]}",
            fix="give every source item its own group_id",
        )
    keep = [
        "row_id",
        "group_id",
        *FIELDS[contract],
        *[c for c in ("label", "split", "source", "category") if c in rows.columns],
    ]
    return rows.select(keep).with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("row_id"))


def _directions(cfg: TranslateConfig) -> list[tuple[str, str]]:
    src = cfg.translate.source_lang
    out = [(src, t) for t in cfg.translate.target_langs]
    if cfg.quality.round_trip:
        out += [(t, src) for t in cfg.translate.target_langs]
    return out


def preflight(cfg: TranslateConfig) -> list[str]:
    """Refuse before any work when the translator has no code for a language; return warnings for languages the
    language identifier cannot check."""
    from raysafe.translate.quality import identifier_languages, make_identifier
    from raysafe.translate.translators import Seq2SeqTranslator

    if cfg.translator.kind == "seq2seq":
        checker = Seq2SeqTranslator(cfg.translator)
        for s, t in _directions(cfg):
            checker.check(s, t)
    make_identifier(cfg.quality.langid)  # importable here, or a ConfigError before the actors start
    warnings = []
    covered = identifier_languages(cfg.quality.langid)
    if covered is not None:
        from raysafe.translate.codes import langid_code

        missing = [t for t in cfg.translate.target_langs if langid_code(t) not in covered]
        if missing:
            warnings.append(
                f"the language identifier ({cfg.quality.langid}) does not know {missing}: their outputs are not "
                "language-checked (the round trip and length checks still apply)"
            )
    return warnings


def identity(cfg: TranslateConfig, contract: str) -> dict:
    from raysafe.translate.translators import translator_identity

    return {
        "contract": contract,
        "source_lang": cfg.translate.source_lang,
        "translator": translator_identity(cfg.translator, _directions(cfg)),
        "scoring": {"langid": cfg.quality.langid, "round_trip": cfg.quality.round_trip},
    }


def _actor_threads(cfg: TranslateConfig) -> int:
    return cfg.ray.torch_threads or max(1, int(cfg.ray.num_cpus_per_actor))


def translate_cells(
    cfg: TranslateConfig, store: TranslationStore, cells: list[tuple[str, int]], fields: list[str], progress: bool
) -> list[dict]:
    """Run the Ray Data pipeline over the missing (language, shard) cells; one summary per cell, progress per
    language on the bar and in MLflow."""
    import ray
    from tqdm.auto import tqdm

    from raysafe.runtime import actor_remote_args, ensure_ray, quiet_ray_data
    from raysafe.translate.stages import TranslateStage

    ensure_ray(cfg.ray)
    quiet_ray_data()  # also keeps a stage's own exception, for remote_errors below
    ds = ray.data.from_items([{"lang": lang, "shard_id": k} for lang, k in cells], override_num_blocks=len(cells))
    ds = ds.map_batches(
        TranslateStage,
        fn_constructor_kwargs={
            "translator": cfg.translator.model_dump(),
            "quality": cfg.quality.model_dump(),
            "store_root": str(store.root),
            "source_lang": cfg.translate.source_lang,
            "fields": fields,
            "torch_threads": _actor_threads(cfg),
        },
        batch_size=1,
        num_gpus=cfg.ray.num_gpus_per_actor or None,
        num_cpus=cfg.ray.num_cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.num_actors),
        **actor_remote_args(cfg.ray),
    )
    todo = Counter(lang for lang, _ in cells)
    done: Counter = Counter()
    summaries = []
    with remote_errors(), tqdm(total=len(cells), desc="translate", unit="cell", disable=not progress) as bar:
        for row in ds.iter_rows():  # an error raised in an actor reaches the user as itself (remote_errors)
            summaries.append(row)
            done[row["lang"]] += 1
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{lang} {done[lang]}/{n}" for lang, n in todo.items()))
            tracking.log_metrics(
                {f"progress_{row['lang']}": done[row["lang"]] / todo[row["lang"]]}, step=len(summaries)
            )
    return summaries


def assemble(cfg: TranslateConfig, store: TranslationStore, inputs: pl.DataFrame, contract: str, n_shards: int):
    """Flag the stored translations and write the contract files; returns (files, report, flagged long table)."""
    from raysafe.translate.quality import Thresholds

    q = cfg.quality
    thresholds = Thresholds(
        q.min_langid_prob, q.min_chrf, q.min_length_ratio, q.max_length_ratio, q.max_unk_rate, q.langid_accept
    )
    long = pl.concat(
        [store.read_language(lang, list(range(n_shards))) for lang in cfg.translate.target_langs],
        how="vertical_relaxed",
    )
    flagged = flag_identical_answers(flag(long, thresholds))
    src = cfg.translate.source_lang
    files = {"translations": store.root / "translations.parquet"}
    atomic_write_parquet(files["translations"], flagged.to_arrow())
    if contract == "preference_pairs":
        pairs = pairs_table(inputs, flagged, src, q.exclude_flagged)
        files["pairs"] = store.root / "pairs.parquet"
        atomic_write_parquet(files["pairs"], pairs.to_arrow())
        units = flagged.group_by(["row_id", "lang"]).agg(pl.col("flagged").any())
        variants = variants_table(inputs, flagged, src, "prompt", q.exclude_flagged)
    else:
        units = flagged.select("row_id", "lang", "flagged")
        variants = variants_table(inputs, flagged, src, "text", q.exclude_flagged)
    files["variants"] = store.root / "variants.parquet"
    atomic_write_parquet(files["variants"], variants.to_arrow())
    report = language_report(flagged, inputs.height, units)
    return files, report, flagged


def unk_warnings(report: pl.DataFrame, max_unk_rate: float) -> list[str]:
    """One warning per language whose outputs have, on average, more unknown tokens than ``max_unk_rate``."""
    return [
        f"{r['lang']}: {100 * r['unk_rate_mean']:.1f} % of output tokens are unknown to the translator's tokenizer "
        f"(over quality.max_unk_rate={max_unk_rate}): it cannot write this language sensibly; its rows are flagged"
        for r in report.iter_rows(named=True)
        if r["unk_rate_mean"] is not None and r["unk_rate_mean"] > max_unk_rate
    ]


def _report_md(cfg: TranslateConfig, report: pl.DataFrame, warnings: list[str], contract: str) -> str:
    cols = report.columns
    lines = [
        f"# Translation report ({contract}, {cfg.translate.source_lang} -> {', '.join(cfg.translate.target_langs)})",
        "",
        f"translator: {cfg.translator.kind} {cfg.translator.label}; flagged rows are "
        f"{'excluded from' if cfg.quality.exclude_flagged else 'kept in'} the contract files and listed in "
        "translations.parquet with their reasons.",
        "",
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in report.iter_rows():
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    lines += [""] + [f"- warning: {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def _check_all_cells_done(store: TranslationStore, cells: list[tuple[str, int]]) -> None:
    """Refuses to assemble while any (language, shard) cell is still missing."""
    still = [(lang, k) for lang, k in cells if k not in store.done_shards(lang)]
    if still:
        raise OutputError(
            f"translation ended with {len(still)} cell(s) missing, e.g. {still[:3]}",
            where=str(store.root),
            fix="re-run the same command: it resumes from the cells already written",
        )


def _run_metrics(report: pl.DataFrame, sentences: int, seconds: float, cells_translated: int) -> dict:
    """The run's MLflow metrics: throughput, and per language the row counts and the quality medians."""
    metrics = {"sentences": sentences, "seconds": seconds, "cells_translated": cells_translated}
    if seconds > 0 and sentences:
        metrics["sentences_per_s"] = sentences / seconds
    for r in report.iter_rows(named=True):
        for key in ("translated", "flagged", "kept"):
            metrics[f"{key}_{r['lang']}"] = r[key]
        for key in ("chrf_median", "langid_prob_median", "length_ratio_median"):
            if r[key] is not None:
                metrics[f"{key}_{r['lang']}"] = r[key]
    return metrics


def _log_outputs(cfg: TranslateConfig, store: TranslationStore, figures) -> None:
    """The output directory, the report files, the config and the quality figures on the MLflow run."""
    tracking.log_params({"output_dir": str(Path(cfg.output_dir).resolve())})
    for p in (store.root / "report.json", store.root / "report.md", store.root / "config.yaml"):
        tracking.log_artifact(p)
    for p in figures:
        tracking.log_artifact(p, "figures")


def run_translate(cfg: TranslateConfig, progress: bool = True) -> TranslateResult:
    """Translate ``cfg.data`` into every target language, score every row, and write the contract files."""
    contract = contract_of(cfg)
    fields = FIELDS[contract]
    inputs = source_rows(cfg, contract)
    fp = fingerprint(inputs)
    store = TranslationStore(cfg.output_dir)
    warnings = preflight(cfg)
    ident = {**identity(cfg, contract), "dataset_fingerprint": fp}
    store.claim(ident)  # refuses, naming the differing fields, before anything is written
    n_shards = store.write_inputs(inputs, cfg.translate.shard_rows, fp)
    cells = [(lang, k) for lang in cfg.translate.target_langs for k in range(n_shards)]
    missing = [(lang, k) for lang, k in cells if k not in store.done_shards(lang)]
    result_files: dict[str, Path] = {}
    with tracking.run(cfg.tracking, "translate", tags={"raysafe.flow": "translate"}) as mlrun:
        tracking.log_params({"config": cfg.model_dump(mode="json"), "dataset_fingerprint": fp})
        tracking.log_input(
            f"{contract}-{cfg.translate.source_lang}", {"data": cfg.data}, fp, inputs.height, context="translation"
        )
        t0 = time.perf_counter()
        summaries = translate_cells(cfg, store, missing, fields, progress) if missing else []
        seconds = time.perf_counter() - t0
        _check_all_cells_done(store, cells)
        files, report, flagged = assemble(cfg, store, inputs, contract, n_shards)
        result_files.update(files)
        warnings += unk_warnings(report, cfg.quality.max_unk_rate)
        for w in warnings:
            log.warning(w)
        atomic_write_json(store.root / "report.json", {"languages": report.to_dicts(), "warnings": warnings})
        atomic_write_bytes(store.root / "report.md", _report_md(cfg, report, warnings, contract).encode())
        figures = quality_figures(flagged, store.root / "figures")
        (store.root / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        sentences = sum(int(s["sentences"]) for s in summaries)
        tracking.log_metrics(_run_metrics(report, sentences, seconds, len(missing)))
        result = TranslateResult(
            Path(cfg.output_dir),
            contract,
            fp,
            len(cells),
            len(missing),
            sentences,
            seconds,
            report,
            result_files,
            warnings,
        )
        if mlrun is not None:
            _log_outputs(cfg, store, figures)
            result.mlflow_run_id = mlrun.info.run_id
    return result
