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

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_json
from raysafe.config import ModelSpec, dump_config
from raysafe.study.config import StudyConfig
from raysafe.tables import write_table

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    output_dir: Path
    stages: dict[str, dict] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    report: Path | None = None
    table: pl.DataFrame | None = None
    mlflow_run_id: str | None = None

    def summary(self) -> str:
        lines = [f"study in {self.output_dir}"]
        for name, info in self.stages.items():
            how = "reused" if name in self.reused else f"{info.get('seconds', 0):.0f} s"
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

    def run(self, name: str, fn: Callable[[], dict[str, Any]], settings: Any) -> dict[str, Any]:
        """Run stage ``name`` unless its marker exists with the same ``settings`` (a stage config, or anything
        JSON-serialisable that determines the stage's output)."""
        k = self.planned.index(name) + 1
        kind = name.split("_")[0]
        forced = kind in self.cfg.force or name in self.cfg.force
        fp = fingerprint(settings)
        previous = json.loads(self.marker(name).read_text()) if self.marker(name).exists() else None
        if previous is not None and not forced and previous.get("settings_fingerprint") == fp:
            info = previous
            log.info("[study %d/%d] %s: done before, reusing %s", k, len(self.planned), name, self.marker(name))
            self.result.reused.append(name)
        else:
            if previous is not None and not forced:
                log.info(
                    "[study %d/%d] %s: its settings changed since it ran; running it again", k, len(self.planned), name
                )
            log.info("[study %d/%d] %s ...", k, len(self.planned), name)
            t0 = time.perf_counter()
            with tracking.parent_run(self.parent):
                info = fn()
            info["seconds"] = time.perf_counter() - t0
            info["settings_fingerprint"] = fp
            atomic_write_json(self.marker(name), info)
            log.info("[study %d/%d] %s finished in %.0f s", k, len(self.planned), name, info["seconds"])
            if self.parent:
                tracking.log_metrics({f"stage_seconds_{name}": info["seconds"]}, run_id=self.parent)
        self.result.stages[name] = info
        return info


def fingerprint(settings: Any) -> str:
    """A short hash of a stage's settings (pydantic configs are dumped as JSON first)."""
    import hashlib

    if hasattr(settings, "model_dump"):
        settings = settings.model_dump(mode="json")
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _paths(d: dict) -> dict[str, str]:
    return {k: str(v) for k, v in d.items()}


def plan(cfg: StudyConfig) -> list[str]:
    analyses = [a for a in ("separation", "concepts", "evaluate") if a not in cfg.skip]
    trained = ["train_mlc"] + (["train_control"] if cfg.control else [])
    consistency = ["consistency"] if "separation" in analyses else []  # reads the separation stage's activations
    return [f"{a}_before" for a in analyses] + trained + [f"{a}_after" for a in analyses] + consistency + ["report"]


def run_study(cfg: StudyConfig, progress: bool = True) -> StudyResult:
    """Run (or continue) the study of ``cfg``; see the module docstring."""
    from raysafe.concepts.flow import run_concepts
    from raysafe.evaluate.flow import run_evaluate
    from raysafe.separation.flow import run_separation
    from raysafe.train.flow import run_train

    cfg.root.mkdir(parents=True, exist_ok=True)
    (cfg.root / "study_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
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

        # ---- the base model
        if "separation" not in cfg.skip:
            c = cfg.separation_config(base, [])
            st.run("separation_before", lambda c=c: _separation(run_separation, c), c)
        if "concepts" not in cfg.skip:
            c = cfg.concepts_config([base], "before")
            st.run("concepts_before", lambda c=c: _concepts(run_concepts, c), c)
        if "evaluate" not in cfg.skip:
            c = cfg.evaluate_config([base], "before")
            st.run("evaluate_before", lambda c=c: _evaluate(run_evaluate, c), c)

        # ---- training
        trained: list[ModelSpec] = []
        for which in ["mlc"] + (["control"] if cfg.control else []):
            c = cfg.train_config(which, base)
            info = st.run(f"train_{which}", lambda c=c: _train(run_train, c), c)
            trained.append(ModelSpec(path=info["model_dir"], name=f"{base.label}-{which}", dtype=base.dtype))

        # ---- the trained checkpoints
        if "separation" not in cfg.skip:
            c = cfg.separation_config(base, trained)
            st.run("separation_after", lambda c=c: _separation(run_separation, c), c)
        if "concepts" not in cfg.skip:
            c = cfg.concepts_config(trained, "after")
            st.run("concepts_after", lambda c=c: _concepts(run_concepts, c), c)
        if "evaluate" not in cfg.skip:
            c = cfg.evaluate_config(trained, "after")
            st.run("evaluate_after", lambda c=c: _evaluate(run_evaluate, c), c)
        if "consistency" in planned:
            st.run(
                "consistency",
                lambda: _consistency(cfg, base, trained),
                {
                    "trained": [m.model_dump() for m in trained],
                    "split": cfg.consistency_split,
                    "train": cfg.train_config("mlc", base).mixture.model_dump(),
                },
            )

        # ---- the report
        from raysafe.study.report import write_study_report

        upstream = {n: i.get("settings_fingerprint") for n, i in st.result.stages.items()}
        info = st.run("report", lambda: write_study_report(cfg, base, trained, st.result.stages), upstream)
        st.result.report = Path(info["report"])
        st.result.table = pl.read_parquet(info["table"])
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


def _evaluate(run, ecfg) -> dict[str, Any]:
    res = run(ecfg, progress=False)
    return {"output_dir": str(res.output_dir), "paths": _paths(res.paths), "mlflow_run_id": res.mlflow_run_id}


def _train(run, tcfg) -> dict[str, Any]:
    res = run(tcfg, progress=False)
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
