"""Starting or joining Ray."""

from __future__ import annotations

import logging
import os

from raysafe.config import RaySpec

log = logging.getLogger(__name__)


def ensure_ray(spec: RaySpec) -> None:
    """Join the cluster at ``spec.address`` / RAY_ADDRESS, or start a local instance (once per process)."""
    import ray

    if ray.is_initialized():
        return
    address = spec.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())


def quiet_ray_data() -> None:
    """Ray Data's own progress bars are replaced by one bar per flow; keep its logs to warnings. A stage's own
    exception is raised as itself: Ray Data otherwise wraps it in ``UserCodeException(...) from e``, and the ``from``
    link does not survive the trip to the driver, so a DataError of a stage could not be shown as one
    (:func:`raysafe.errors.unwrap_remote_error`)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True


def actor_remote_args(spec: RaySpec) -> dict:
    """Ray remote args for a model actor pool: its OpenMP wait policy (``spec.omp_wait_policy``), set through the
    actor's runtime_env because OpenMP reads it once, when torch loads in the worker process. Ray merges it with a
    job's own runtime_env (``ray job submit --runtime-env-json``)."""
    if spec.omp_wait_policy == "inherit":
        return {}
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": spec.omp_wait_policy.upper()}}}
