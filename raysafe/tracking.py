"""The one place that talks to MLflow: runs and their nesting, params, metrics, artifacts, dataset inputs, system
metrics, and logging from another process (a Ray Train worker) into a run started here. Nothing else in the package
imports mlflow, so another tracker is one file (tests/test_layering.py keeps it so).

Default store: ``sqlite:///mlflow.db`` in the working directory (artifacts beside it in ``mlartifacts/``), or
``MLFLOW_TRACKING_URI``. Before a run starts the tracking server is probed with a short timeout, so a job whose
server is down fails at once with the URI in the message (or, with ``fallback_to_local``, logs locally and says so)
instead of hanging on retries.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from raysafe.config import ModelSpec, SourceSpec, TrackingSpec
from raysafe.errors import RaysafeError

log = logging.getLogger(__name__)

LOCAL_URI = "sqlite:///mlflow.db"


class TrackingError(RaysafeError):
    """The MLflow tracking server cannot be reached."""


def resolve_uri(spec: TrackingSpec) -> str:
    return spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_URI


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute, so another process or working directory finds the store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def _probe(uri: str, timeout: float = 5.0) -> str | None:
    """None if reachable, else the reason. Only http(s) servers are probed; file/sqlite stores are local."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return None if r.status < 500 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return str(getattr(e, "reason", e))


def configure(spec: TrackingSpec) -> str | None:
    """Point mlflow at the configured store; returns the URI in use, or None when tracking is off."""
    if not spec.enabled:
        return None
    import mlflow

    uri = resolve_uri(spec)
    reason = _probe(uri)
    if reason is not None:
        if not spec.fallback_to_local:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason})",
                where="tracking.tracking_uri / MLFLOW_TRACKING_URI",
                fix="start the server (see cluster/mlflow), fix the URI, or set tracking.fallback_to_local=true",
            )
        # Say exactly where the runs go: on a cluster the job's cwd is a per-job working directory on the head node.
        local = Path(LOCAL_URI.removeprefix("sqlite:///")).resolve()
        log.warning(
            "MLflow server %s unreachable (%s): logging to the local store sqlite:///%s (artifacts in %s) "
            "instead; copy them off this node or re-log them once the server is back",
            uri,
            reason,
            local,
            Path("mlartifacts").resolve(),
        )
        uri = LOCAL_URI
    if uri.startswith("sqlite:///"):
        # Keep local artifacts beside the database rather than in ./mlruns of whatever cwd a worker has.
        os.environ.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(Path("mlartifacts").resolve()))
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(spec.experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            artifact_location = Path("mlartifacts").resolve().as_uri()
        mlflow.create_experiment(spec.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(spec.experiment)
    return uri


def system_metrics_gaps(have_psutil: bool, have_nvml: bool, gpus_visible: bool) -> list[str]:
    """What MLflow's system-metrics sampler will leave out, and what to install (a pure function of what is
    importable: psutil samples CPU, memory, disk and network; pynvml, from the nvidia-ml-py package, the GPUs)."""
    gaps = []
    if not have_psutil:
        gaps.append("CPU/memory/disk/network metrics need psutil (pip install psutil)")
    if gpus_visible and not have_nvml:
        gaps.append("GPU metrics need pynvml (pip install nvidia-ml-py)")
    return gaps


def _warn_system_metrics_gaps(where: str) -> None:
    import importlib.util

    torch = sys.modules.get("torch")  # only when the flow already imported it: GPUs are asked of torch, not probed
    gpus = bool(torch is not None and torch.cuda.is_available())
    found = [importlib.util.find_spec(m) is not None for m in ("psutil", "pynvml")]
    for gap in system_metrics_gaps(found[0], found[1], gpus):
        log.warning("system metrics (%s): %s", where, gap)


_PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("raysafe_mlflow_parent", default=None)


@contextlib.contextmanager
def parent_run(run_id: str | None) -> Iterator[None]:
    """Inside this block every :func:`run` becomes a child run of ``run_id`` (how `raysafe study` nests its stages)."""
    token = _PARENT.set(run_id)
    try:
        yield
    finally:
        _PARENT.reset(token)


@contextlib.contextmanager
def run(
    spec: TrackingSpec,
    name: str,
    *,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run (or ``None`` when tracking is off) as a context manager. ``resume_run_id``: continue that run
    when it exists in the store in use (a resumed study keeps one parent run), else start a new one."""
    if configure(spec) is None:
        yield None
        return
    import mlflow

    if spec.log_system_metrics:
        _warn_system_metrics_gaps("this process")

    if resume_run_id:
        try:
            mlflow.MlflowClient().get_run(resume_run_id)
        except mlflow.exceptions.MlflowException:
            log.info("MLflow run %s is not in this tracking store; starting a new run", resume_run_id)
        else:
            with (
                mlflow.start_run(run_id=resume_run_id, log_system_metrics=spec.log_system_metrics or None) as r,
                _killed_on_exit(r),
            ):
                yield r
            return

    kwargs: dict[str, Any] = {
        "run_name": spec.run_name or name,
        "tags": tags or {},
        "log_system_metrics": spec.log_system_metrics or None,  # None: MLflow's own environment variable decides
    }
    parent_run_id = parent_run_id or _PARENT.get()
    if parent_run_id:
        kwargs["parent_run_id"] = parent_run_id
        kwargs["nested"] = True
    elif nested:
        kwargs["nested"] = True
    with mlflow.start_run(**kwargs) as r, _killed_on_exit(r):
        yield r


@contextlib.contextmanager
def _killed_on_exit(active: Any) -> Iterator[None]:
    """A run whose process is being stopped (Ctrl-C, a Tune scheduler's stop, ``sys.exit``) ends KILLED, not
    FAILED: it did not fail, and a resumed flow continues it."""
    import mlflow

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        if any(r.info.run_id == active.info.run_id for r in [mlflow.active_run()] if r is not None):
            mlflow.end_run("KILLED")
        raise


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict → {"a.b": "value"} with values truncated to MLflow's param length limit."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_params(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = str(obj)[:6000]
    return out


def _active_mlflow() -> Any:
    """The mlflow module when a run is active, else None — without importing mlflow (3 s) when tracking is off: no
    run can be active in a process that never imported it."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


def log_params(params: dict[str, Any]) -> None:
    if (mlflow := _active_mlflow()) is not None:
        mlflow.log_params(flat_params(params))


def _metric_names(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("/", "_").replace(" ", "_").replace("=", "_"): float(v) for k, v in metrics.items()}


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    """Log to the active run, or to ``run_id`` (e.g. a parent run while its children run)."""
    if run_id is not None:
        import mlflow

        _log_batch(mlflow.MlflowClient(), run_id, metrics, step)
    elif (mlflow := _active_mlflow()) is not None:
        mlflow.log_metrics(_metric_names(metrics), step=step)


def _log_batch(client: Any, run_id: str, metrics: dict[str, float], step: int | None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in _metric_names(metrics).items()])


def log_input(name: str, sources: dict[str, SourceSpec], digest: str, n_rows: int, context: str) -> None:
    """Record a dataset the active run read (MLflow's run inputs): its name, where it came from (the source settings,
    as JSON), its content digest (:func:`raysafe.identity.fingerprint` of the rows) and its row count."""
    source = {k: v.model_dump(mode="json", exclude_defaults=True) for k, v in sources.items()}
    source_type = "hugging_face" if any(v.kind == "hub" for v in sources.values()) else "local"
    log_dataset(name, source, digest, n_rows, context, source_type)


def log_dataset(
    name: str, source: dict[str, Any], digest: str, n_rows: int | None, context: str, source_type: str = "local"
) -> None:
    """Record a dataset the active run read that is not a configured source (e.g. stored activations: ``source``
    names the store and what its contents were made from, ``digest`` is their identity)."""
    if (mlflow := _active_mlflow()) is None:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name,
        digest=digest,
        source_type=source_type,
        source=json.dumps(source, sort_keys=True, default=str),
        profile=json.dumps({"num_rows": n_rows}) if n_rows is not None else None,
    )
    run_id = mlflow.active_run().info.run_id
    mlflow.MlflowClient().log_inputs(
        run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    )


# ------------------------------------------------------------------------------------------ checkpoint lineage
#: Files a training checkpoint keeps beside its Hugging Face directory (``<checkpoint>/model``): the identity of the
#: run that wrote it and its trainer state (raysafe.train.identity.IDENTITY_FILE, raysafe.train.checkpoint.STATE_FILE;
#: a test keeps the names equal, since shared machinery does not import a flow).
IDENTITY_FILE = "run_identity.json"
STATE_FILE = "trainer_state.json"


def checkpoint_lineage(model_dir: str | Path) -> dict[str, Any] | None:
    """Where a model directory came from, when it is a raysafe training checkpoint's export (``<ckpt>/model``) or the
    checkpoint itself: {checkpoint, identity (digest of its run identity), step}; None for any other model (a hub id,
    a GGUF file, a directory without the training files)."""
    from raysafe.identity import digest

    path = Path(model_dir)
    if not path.is_dir():
        return None
    for ckpt in (path, path.parent):
        ident = ckpt / IDENTITY_FILE
        if ident.is_file():
            try:
                identity = json.loads(ident.read_text())
                state = json.loads((ckpt / STATE_FILE).read_text()) if (ckpt / STATE_FILE).is_file() else {}
            except (OSError, ValueError) as e:
                log.warning("cannot read the training lineage in %s (%s): not recorded", ckpt, e)
                return None
            return {"checkpoint": str(ckpt.absolute()), "identity": digest(identity), "step": state.get("step")}
    return None


def log_checkpoint(ckpt_dir: str | Path, files: tuple[str, ...] = ()) -> None:
    """Link a trained checkpoint to the active run that made it: its location and identity digest as a parameter and
    tags (``raysafe.checkpoint``, ``raysafe.checkpoint.identity``, ``raysafe.checkpoint.step``), ``files`` of it as
    artifacts, and an MLflow model whose weights stay outside MLflow (``create_external_model``: source run = this
    run, params = location, identity, step), which the runs that later load it take as their model input."""
    if (mlflow := _active_mlflow()) is None:
        return
    ckpt = Path(ckpt_dir).absolute()
    lineage = checkpoint_lineage(ckpt) or {"checkpoint": str(ckpt), "identity": "unknown", "step": None}
    tags = {
        "raysafe.checkpoint": lineage["checkpoint"],
        "raysafe.checkpoint.identity": lineage["identity"],
        "raysafe.checkpoint.step": str(lineage["step"]),
    }
    mlflow.log_params({"checkpoint": lineage["checkpoint"]})
    for f in files:
        if (ckpt / f).exists():
            log_artifact(ckpt / f)
    try:
        model = mlflow.create_external_model(
            name=f"checkpoint-{lineage['identity']}",
            source_run_id=mlflow.active_run().info.run_id,
            params={k: str(v) for k, v in lineage.items()},
            tags={"raysafe.identity": lineage["identity"]},
            model_type="raysafe-checkpoint",
        )
        tags["raysafe.checkpoint.model_id"] = model.model_id
    except mlflow.exceptions.MlflowException as e:  # a tracking server without MLflow 3's logged models
        log.warning("the tracking server cannot record the checkpoint as an MLflow model (%s): tags only", e)
    mlflow.set_tags(tags)


def log_model_lineage(label: str, model_path: str) -> dict[str, Any] | None:
    """On the active run, record which training run and identity the model ``label`` (at ``model_path``) came from,
    when it is a raysafe checkpoint: tags ``raysafe.model.<label>.checkpoint`` / ``.identity`` / ``.step`` /
    ``.train_run`` (the run tagged with that checkpoint identity, in any experiment of the store), and the training
    run's external model as a model input of this run. Returns the lineage (None for other models)."""
    if (mlflow := _active_mlflow()) is None:
        return None
    lineage = checkpoint_lineage(model_path)
    if lineage is None:
        return None
    tags = {f"raysafe.model.{label}.{k}": str(v) for k, v in lineage.items()}
    producers = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`raysafe.checkpoint.identity` = '{lineage['identity']}'",
        output_format="list",
        order_by=["attributes.start_time DESC"],
    )
    if producers:
        run = producers[0]
        lineage["train_run"] = run.info.run_id
        tags[f"raysafe.model.{label}.train_run"] = run.info.run_id
        model_id = run.data.tags.get("raysafe.checkpoint.model_id")
        if model_id:
            from mlflow.entities import LoggedModelInput

            try:
                mlflow.MlflowClient().log_inputs(mlflow.active_run().info.run_id, models=[LoggedModelInput(model_id)])
            except mlflow.exceptions.MlflowException as e:
                log.warning("cannot record model %s as an input of this run (%s): tags only", model_id, e)
    else:
        log.info(
            "model %s comes from checkpoint %s, whose training run is not in this store", label, lineage["checkpoint"]
        )
    mlflow.set_tags(tags)
    return lineage


def log_artifact(path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
    """Log a file or a directory to the active run, or to ``run_id`` (e.g. a parent run while children ran)."""
    p = Path(path)
    if run_id is not None:
        import mlflow

        client = mlflow.MlflowClient()
        (client.log_artifacts if p.is_dir() else client.log_artifact)(run_id, str(p), artifact_path)
    elif (mlflow := _active_mlflow()) is not None:
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path)
        else:
            mlflow.log_artifact(str(p), artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    if (mlflow := _active_mlflow()) is not None:
        mlflow.set_tags(tags)


def end_run(
    run_id: str, status: str = "KILLED", tags: dict[str, str] | None = None, running_descendants: bool = True
) -> None:
    """Tag a run that is not the active one and mark it ended with ``status`` — e.g. a sweep trial whose process the
    scheduler ended mid-run — together with its descendants still marked RUNNING (its training run)."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    if running_descendants:
        for child in client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"):
            end_run(child.info.run_id, status, None, True)
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def running_children(run_id: str) -> list[str]:
    """Ids of the child runs of ``run_id`` still marked RUNNING."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    return [
        r.info.run_id
        for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
    ]


# ------------------------------------------------------------------------------------------ other processes
def attach_info(spec: TrackingSpec, active: Any) -> dict | None:
    """What another process (a Ray Train worker) needs to log into the run ``active`` started here: the tracking URI
    (a relative SQLite path made absolute, since a worker's cwd differs), the run id and whether to sample system
    metrics there. None when tracking is off."""
    if active is None:
        return None
    import mlflow

    uri = absolute_uri(mlflow.get_tracking_uri())  # what configure() chose (the local store after a fallback)
    return {"uri": uri, "run_id": active.info.run_id, "system_metrics": spec.log_system_metrics}


class AttachedRun:
    """Logging into a run another process started (see :func:`attach`). ``log_metrics`` writes to that run;
    ``close`` stops the system-metrics sampler. The run's status stays with the process that owns it: a worker that
    finishes, fails or is restarted by Ray Train neither ends nor fails it."""

    def __init__(self, info: dict | None, node: str | None = None):
        self.run_id = info["run_id"] if info else None
        self._client = None
        self._monitor = None
        if info is None:
            return
        import mlflow

        self._client = mlflow.MlflowClient(info["uri"])
        self._client.get_run(self.run_id)  # fail here, with MLflow's message, if the run is not in that store
        if info.get("system_metrics"):
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            _warn_system_metrics_gaps(node or "attached process")

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, node_id=node, tracking_uri=info["uri"]
            )
            self._monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._client is not None:
            _log_batch(self._client, self.run_id, metrics, step)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def attach(info: dict | None, node: str | None = None) -> AttachedRun:
    """Attach to the run :func:`attach_info` describes (``None``: a logger that does nothing, e.g. on ranks > 0).
    ``node`` names this process in system metrics (``system/<node>/...``), apart from the driver's ``system/...``."""
    return AttachedRun(info, node)


def log_models_lineage(models: Iterable[ModelSpec]) -> None:
    """:func:`log_model_lineage` for each model a flow loads."""
    for m in models:
        log_model_lineage(m.label, m.path)
