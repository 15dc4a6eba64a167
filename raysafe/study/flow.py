"""`raysafe study`: the closed loop — analyse the base model, align it with MLC, analyse what changed.

Stages, in order (each one a child run of the study's MLflow parent run)::

    separation_before  concepts_before  evaluate_before      the base model
    train_mlc  [train_control]                               MLC training (and the λ = 0 control)
    separation_after  concepts_after  evaluate_after          the trained checkpoints (base activations reused)
    consistency                                              held-out cross-lingual consistency at the MLC layer
    report                                                   before/after tables, figures, report.md

Each finished stage writes ``<output_dir>/stages/<stage>.json`` (atomically); a re-run reuses finished stages
(unless listed in ``force``), and the flows inside a stage resume their own partial work (extraction and generation
shards, training checkpoints), so an interrupted study continues where it stopped — under the same MLflow parent
run (its id is kept in ``stages/mlflow_parent_run.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_bytes, atomic_write_json
from raysafe.config import ModelSpec, dump_config
from raysafe.identity import differences, digest, flatten
from raysafe.study.config import StudyConfig
from raysafe.tables import write_table

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    output_dir: Path
    stages: dict[str, dict] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # stage -> what changed since it last ran
    report: Path | None = None
    table: pl.DataFrame | None = None
    mlflow_run_id: str | None = None

    def summary(self) -> str:
        lines = [f"study in {self.output_dir}"]
        for name, info in self.stages.items():
            how = "reused" if name in self.reused else f"{info.get('seconds', 0):.0f} s"
            if name in self.changed:
                shown = "; ".join(self.changed[name][:3]) + (" ..." if len(self.changed[name]) > 3 else "")
                how += f" (ran again: {shown})"
            lines.append(f"  {name:<18} {how}")
        if self.table is not None:
            from raysafe.study.report import markdown

            lines += ["", markdown(self.table)]
        lines.append(f"report: {self.report}")
        if self.mlflow_run_id:
            lines.append(f"MLflow parent run {self.mlflow_run_id}")
        return "\n".join(lines)


class _Stages:
    """Runs stages with reuse, progress and child runs."""

    def __init__(self, cfg: StudyConfig, planned: list[str], parent_run_id: str | None):
        self.cfg, self.planned, self.parent = cfg, planned, parent_run_id
        self.dir = cfg.root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.result = StudyResult(cfg.root)

    def marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def run(self, name: str, fn: Callable[[bool], dict[str, Any]], identity: dict[str, Any]) -> dict[str, Any]:
        """Run stage ``name`` unless its marker holds the same ``identity`` (:func:`stage_identity`).

        ``fn(restart)`` runs the stage; ``restart`` is true when the stage is forced, or when it is a training stage
        whose recorded identity differs: its flow then moves the old outputs aside and starts afresh."""
        k = self.planned.index(name) + 1
        kind = name.split("_")[0]
        forced = kind in self.cfg.force or name in self.cfg.force
        fp = digest(identity)
        previous = json.loads(self.marker(name).read_text()) if self.marker(name).exists() else None
        if previous is not None and not forced and previous.get("identity_fingerprint") == fp:
            info = previous
            log.info("[study %d/%d] %s: done before, reusing %s", k, len(self.planned), name, self.marker(name))
            self.result.reused.append(name)
        else:
            restart = forced
            if previous is not None and not forced:
                changed = differences(previous.get("identity") or {}, identity)
                self.result.changed[name] = changed
                restart = kind == "train"  # another run in the same run directory: the old one is moved aside
                log.warning(
                    "[study %d/%d] %s: what it depends on changed since it ran (%s); running it again",
                    k,
                    len(self.planned),
                    name,
                    "; ".join(changed[:8]) + (f"; ... {len(changed) - 8} more" if len(changed) > 8 else ""),
                )
            log.info("[study %d/%d] %s ...", k, len(self.planned), name)
            t0 = time.perf_counter()
            with tracking.parent_run(self.parent):
                info = fn(restart)
            info["seconds"] = time.perf_counter() - t0
            info["identity_fingerprint"] = fp
            info["identity"] = identity
            atomic_write_json(self.marker(name), info)
            log.info("[study %d/%d] %s finished in %.0f s", k, len(self.planned), name, info["seconds"])
            if self.parent:
                tracking.log_metrics({f"stage_seconds_{name}": info["seconds"]}, run_id=self.parent)
        self.result.stages[name] = info
        return info


def _data_fingerprints(tree: Any, prefix: str = "") -> dict[str, str]:
    """Content digests of every local data source (a file, a directory of files, a bundled fixture) that a stage
    config names, keyed by where it is named."""
    from raysafe.data.sources import FIXTURES, fixture_path

    out: dict[str, str] = {}
    if isinstance(tree, dict):
        path = None
        if tree.get("kind") == "file" and isinstance(tree.get("path"), str):
            path = Path(tree["path"])
        elif tree.get("kind") == "fixture" and isinstance(tree.get("name"), str):
            path = fixture_path(FIXTURES[0]).parent / f"{tree['name']}.jsonl"  # the flows' own fixtures too
        if path is not None:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.is_file() else b"<missing>")
            out[f"data: {prefix.rstrip('.') or 'source'}"] = h.hexdigest()[:20]
        for k, v in tree.items():
            out.update(_data_fingerprints(v, f"{prefix}{k}."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(_data_fingerprints(v, f"{prefix}{i}."))
    return out


def stage_identity(settings: Any, models: list[ModelSpec] = (), upstream: dict[str, Any] | None = None) -> dict:
    """What a stage's output depends on, as named fields: its settings (a stage config, or any JSON-serialisable
    value) less tracking and Ray resources, the content of the local data files it reads, the weights fingerprint
    of each model, and the identity fingerprints of the stages it builds on."""
    from raysafe.models.loading import resolve

    if hasattr(settings, "model_dump"):
        settings = settings.model_dump(mode="json")
    cosmetic = ("tracking", "ray")
    flat = {k: v for k, v in flatten(settings).items() if k.split(".")[0] not in cosmetic}
    flat.update(_data_fingerprints(settings))
    for m in models:
        flat[f"weights: {m.label}"] = resolve(m).fingerprint
    for name, fp in (upstream or {}).items():
        flat[f"stage: {name}"] = fp
    return flat


def _paths(d: dict) -> dict[str, str]:
    return {k: str(v) for k, v in d.items()}


def plan(cfg: StudyConfig) -> list[str]:
    analyses = [a for a in ("separation", "concepts", "evaluate") if a not in cfg.skip]
    trained = ["train_mlc"] + (["train_control"] if cfg.control else [])
    consistency = ["consistency"] if "separation" in analyses else []  # reads the separation stage's activations
    return [f"{a}_before" for a in analyses] + trained + [f"{a}_after" for a in analyses] + consistency + ["report"]


def run_study(cfg: StudyConfig, progress: bool = True, restart: bool = False) -> StudyResult:
    """Run (or continue) the study of ``cfg``; see the module docstring. The output directory is locked while the
    study runs; ``restart`` moves an existing one aside (``<dir>.replaced-<UTC time>``) and starts afresh."""
    from raysafe.evaluate.flow import check_generation_backend
    from raysafe.locks import move_aside, output_lock

    if "evaluate" not in cfg.skip:  # the evaluation's generation backend can run (vllm installed), before any stage
        check_generation_backend(cfg.evaluate.get("generation", {}), "evaluate.generation.backend")
    with output_lock(cfg.root, f"study {cfg.root}"):
        if restart:
            move_aside(cfg.root)
        return _run_study(cfg)


def _base_model_stages(cfg: StudyConfig, st: _Stages, base: ModelSpec) -> None:
    """Separation, concepts and evaluation of the base model (each unless skipped)."""
    from raysafe.concepts.flow import run_concepts
    from raysafe.evaluate.flow import run_evaluate
    from raysafe.separation.flow import run_separation

    if "separation" not in cfg.skip:
        c = cfg.separation_config(base, [])
        st.run("separation_before", lambda _, c=c: _separation(run_separation, c), stage_identity(c, [base]))
    if "concepts" not in cfg.skip:
        c = cfg.concepts_config([base], "before")
        st.run("concepts_before", lambda _, c=c: _concepts(run_concepts, c), stage_identity(c, [base]))
    if "evaluate" not in cfg.skip:
        c = cfg.evaluate_config([base], "before")
        st.run("evaluate_before", lambda r, c=c: _evaluate(run_evaluate, c, r), stage_identity(c, [base]))


def _training_stages(cfg: StudyConfig, st: _Stages, base: ModelSpec) -> list[ModelSpec]:
    """The MLC run (and the control run) of the base model; returns the trained models. A stage's identity is its
    run's (config less cosmetic fields, data, weights, versions)."""
    from raysafe.train.flow import identity_of, run_train, validate

    trained: list[ModelSpec] = []
    for which in ["mlc"] + (["control"] if cfg.control else []):
        c = cfg.train_config(which, base)
        info = st.run(f"train_{which}", lambda r, c=c: _train(run_train, c, r), identity_of(c, validate(c)[0]))
        trained.append(ModelSpec(path=info["model_dir"], name=f"{base.label}-{which}", dtype=base.dtype))
    return trained


def _trained_model_stages(cfg: StudyConfig, st: _Stages, base: ModelSpec, trained: list, planned) -> None:
    """Separation, concepts and evaluation of the trained checkpoints, and the held-out consistency check."""
    from raysafe.concepts.flow import run_concepts
    from raysafe.evaluate.flow import run_evaluate
    from raysafe.separation.flow import run_separation

    after = {n: i["identity_fingerprint"] for n, i in st.result.stages.items() if n.startswith("train_")}
    if "separation" not in cfg.skip:
        c = cfg.separation_config(base, trained)
        st.run(
            "separation_after",
            lambda _, c=c: _separation(run_separation, c),
            stage_identity(c, [base, *trained], after),
        )
    if "concepts" not in cfg.skip:
        c = cfg.concepts_config(trained, "after")
        st.run("concepts_after", lambda _, c=c: _concepts(run_concepts, c), stage_identity(c, trained, after))
    if "evaluate" not in cfg.skip:
        c = cfg.evaluate_config(trained, "after")
        st.run("evaluate_after", lambda r, c=c: _evaluate(run_evaluate, c, r), stage_identity(c, trained, after))
    if "consistency" in planned:
        settings = {
            "trained": [m.model_dump() for m in trained],
            "split": cfg.consistency_split,
            "train": cfg.train_config("mlc", base).mixture.model_dump(),
        }
        upstream = {n: i["identity_fingerprint"] for n, i in st.result.stages.items() if "separation" in n}
        st.run("consistency", lambda _: _consistency(cfg, base, trained), stage_identity(settings, [], upstream))


def _report_stage(cfg: StudyConfig, st: _Stages, base: ModelSpec, trained: list[ModelSpec]) -> None:
    """The study report, its identity chained from every stage's; its path and table go on the result."""
    from raysafe.study.report import write_study_report

    upstream = {n: i.get("identity_fingerprint") for n, i in st.result.stages.items()}
    info = st.run(
        "report",
        lambda _: write_study_report(cfg, base, trained, st.result.stages),
        stage_identity({}, [], upstream),
    )
    st.result.report = Path(info["report"])
    st.result.table = pl.read_parquet(info["table"])


def _run_study(cfg: StudyConfig) -> StudyResult:
    cfg.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.root / "study_config.yaml", dump_config(cfg).encode())
    planned = plan(cfg)
    base = cfg.model
    parent_file = cfg.root / "stages" / "mlflow_parent_run.json"
    previous = json.loads(parent_file.read_text())["run_id"] if parent_file.exists() else None
    with tracking.run(
        cfg.tracking, f"study {base.label}", tags={"raysafe.flow": "study"}, resume_run_id=previous
    ) as parent:
        parent_id = parent.info.run_id if parent is not None else None
        if parent is not None and parent_id != previous:
            tracking.log_params({"study": cfg.model_dump(mode="json")})
            parent_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(parent_file, {"run_id": parent_id})
        st = _Stages(cfg, planned, parent_id)
        st.result.mlflow_run_id = parent_id
        _base_model_stages(cfg, st, base)
        trained = _training_stages(cfg, st, base)
        _trained_model_stages(cfg, st, base, trained, planned)
        _report_stage(cfg, st, base, trained)
        if parent is not None:
            tracking.log_artifact(st.result.report.parent, "report", run_id=parent_id)
    return st.result


# ------------------------------------------------------------------------------------------------- stages
def _separation(run, scfg) -> dict[str, Any]:
    res = run(scfg, progress=False)
    return {
        "output_dir": str(res.output_dir),
        "tables": _paths(res.tables),
        "figures": [str(p) for p in res.figures],
        "report": str(res.report),
        "models": res.models,
        "mlflow_run_id": res.mlflow_run_id,
        "problems": res.problems[:50],
    }


def _concepts(run, ccfg) -> dict[str, Any]:
    res = run(ccfg, progress=False)
    return {
        "output_dir": str(res.output_dir),
        "report": str(res.report),
        "mlflow_run_id": res.mlflow_run_id,
        "models": {
            k: {
                "headline": m.headline,
                "recognition_by_lang": m.recognition_by_lang,
                "error": m.error,
                "report": str(m.report),
            }
            for k, m in res.models.items()
        },
    }


def _evaluate(run, ecfg, restart: bool) -> dict[str, Any]:
    res = run(ecfg, progress=False, restart=restart)
    return {"output_dir": str(res.output_dir), "paths": _paths(res.paths), "mlflow_run_id": res.mlflow_run_id}


def _train(run, tcfg, restart: bool) -> dict[str, Any]:
    res = run(tcfg, progress=False, restart=restart)
    return {
        "checkpoint_dir": str(res.checkpoint_dir),
        "model_dir": str(res.model_dir),
        "steps": res.steps,
        "metrics": {k: float(v) for k, v in res.metrics.items()},
        "mlflow_run_id": res.mlflow_run_id,
        "mlc_weight": tcfg.mlc.weight,
    }


def _consistency(cfg: StudyConfig, base: ModelSpec, trained: list[ModelSpec]) -> dict[str, Any]:
    """Held-out cross-lingual consistency of last-prompt-token states of the base, MLC and control models, every
    extracted layer (the activations of the separation stages): the movable measures with bootstrap intervals and
    the paired MLC − control, MLC − base and control − base differences at the MLC layer (raysafe.study.measures)."""
    from raysafe.extract.flow import ActivationStore
    from raysafe.models.loading import model_depth
    from raysafe.study.measures import HEADLINE_MEASURES, held_out_tables

    scfg = cfg.separation_config(base, trained)
    store = ActivationStore(scfg.store_dir("safety"))
    roles = {"base": base.label, **{m.label.removeprefix(f"{base.label}-"): m.label for m in trained}}
    roles = {r: m for r, m in roles.items() if m in store.models()}
    tcfg = cfg.train_config("mlc", base)
    mlc_layer = tcfg.mlc.resolve_layer(model_depth(tcfg.model))
    layers = sorted(set(store.layers(roles["base"])))
    langs = tcfg.mixture.languages
    by_layer, diffs = held_out_tables(
        store.reader("last"), roles, layers, langs, tcfg.mixture.anchor, cfg.consistency_split, mlc_layer
    )
    out = cfg.root / "consistency"
    out.mkdir(parents=True, exist_ok=True)
    path = write_table(by_layer, out, "consistency")[0]
    diff_path = write_table(diffs, out, "differences")[0]
    with tracking.run(cfg.tracking, "consistency", tags={"raysafe.flow": "consistency"}) as r:
        if r is not None:
            at = by_layer.filter((pl.col("layer") == mlc_layer) & pl.col("measure").is_in(HEADLINE_MEASURES))
            tracking.log_metrics(
                {
                    f"{role}_{measure}_{lang}_L{mlc_layer}": v
                    for role, measure, lang, v in at.select("role", "measure", "lang", "value").iter_rows()
                }
            )
            tracking.log_artifact(out / "consistency.csv")
            tracking.log_artifact(out / "differences.csv")
    return {
        "table": str(path),
        "differences": str(diff_path),
        "mlc_layer": mlc_layer,
        "languages": list(langs),
        "anchor": tcfg.mixture.anchor,
        "roles": roles,
    }
