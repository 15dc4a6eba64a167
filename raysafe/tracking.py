"""The one place that talks to MLflow.

Default store: ``sqlite:///mlflow.db`` in the working directory (artifacts beside it in ``mlartifacts/``), or
``MLFLOW_TRACKING_URI``. Before a run starts the tracking server is probed with a short timeout, so a job whose
server is down fails at once with the URI in the message (or, with ``fallback_to_local``, logs locally and says so)
instead of hanging on retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from raysafe.config import TrackingSpec
from raysafe.errors import RaysafeError

log = logging.getLogger(__name__)

LOCAL_URI = "sqlite:///mlflow.db"


class TrackingError(RaysafeError):
    """The MLflow tracking server cannot be reached."""


def resolve_uri(spec: TrackingSpec) -> str:
    return spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_URI


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
        log.warning("MLflow server %s unreachable (%s): logging to the local store %s instead", uri, reason, LOCAL_URI)
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


@contextlib.contextmanager
def run(spec: TrackingSpec, name: str, *, nested: bool = False, parent_run_id: str | None = None,
        tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run (or ``None`` when tracking is off) as a context manager."""
    if configure(spec) is None:
        yield None
        return
    import mlflow

    kwargs: dict[str, Any] = {"run_name": spec.run_name or name, "tags": tags or {}}
    if parent_run_id:
        kwargs["parent_run_id"] = parent_run_id
        kwargs["nested"] = True
    elif nested:
        kwargs["nested"] = True
    with mlflow.start_run(**kwargs) as r:
        yield r


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict → {"a.b": "value"} with values truncated to MLflow's param length limit."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_params(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = str(obj)[:6000]
    return out


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_params(flat_params(params))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        clean = {k.replace("/", "_").replace(" ", "_").replace("=", "_"): float(v) for k, v in metrics.items()}
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path)
        else:
            mlflow.log_artifact(str(p), artifact_path)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)
