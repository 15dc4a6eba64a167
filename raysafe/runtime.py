"""Starting or joining Ray."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

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
        # With the dashboard: it serves Ray's State API, which Ray Train V2's PlacementGroupCleaner (a detached actor
        # every TorchTrainer.fit starts) asks once a second whether the Train controller is alive. Without it every
        # ask fails and logs "Failed to query Ray Train Controller actor state" for as long as training runs.
        ray.init(include_dashboard=True, **kwargs)
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


# ------------------------------------------------------------------------------------------------- capacity
@dataclass(frozen=True)
class Capacity:
    """What the cluster holds now and the most it can grow to (resource name -> amount; None: unknown), and where
    that came from.

    On a cluster that scales from zero (``cluster/aws-gpu.yaml``, the KubeRay manifests) the nodes that are up hold
    no GPUs (often no CPUs for work either) until Ray's autoscaler adds them for a pending request: work is sized and
    refused against ``most``, and started even when ``now`` cannot hold it yet."""

    now: dict[str, float]
    most: dict[str, float] | None
    source: str

    def shortfall(self, need: dict[str, float]) -> list[str]:
        """``"<n> <resource>s (it can hold <m>)"`` for every resource of ``need`` that even the full cluster lacks
        (none when the most is unknown)."""
        if self.most is None:
            return []
        return [
            f"{amount:g} {key}s (it can hold {self.most.get(key, 0.0):g})"
            for key, amount in need.items()
            if amount > self.most.get(key, 0.0) + 1e-9
        ]

    def waits_for_nodes(self, need: dict[str, float]) -> bool:
        """Whether ``need`` exceeds what the nodes that are up hold now (the autoscaler has to add nodes)."""
        return any(amount > self.now.get(key, 0.0) + 1e-9 for key, amount in need.items())

    def describe(self, keys: tuple[str, ...] = ("CPU", "GPU")) -> str:
        def fmt(d: dict[str, float]) -> str:
            return ", ".join(f"{d.get(k, 0.0):g} {k}" for k in keys)

        most = fmt(self.most) if self.most is not None else "unknown"
        return f"now {fmt(self.now)}; at most {most} ({self.source})"


CAPACITY_SOURCES = {
    "autoscaler": "the autoscaler's node types and their max workers",
    "config": "ray.capacity in the config",
    "unknown": "an autoscaler runs but reports no limits: set ray.capacity to have work sized and refused",
    "static": "the nodes that are up; no autoscaler runs",
}


def capacity_from(
    live: dict[str, float],
    limits: dict[str, float] | None,
    declared: dict[str, float] | None,
    autoscaling: bool = False,
) -> Capacity:
    """The cluster's capacity from its live resources, the autoscaler's limits (None: it reports none), the
    config's ``ray.capacity`` (None: not set) and whether an autoscaler runs at all. The most a cluster can hold is
    what its autoscaler can grow it to; where the autoscaler reports no limits (the cluster launcher's default
    autoscaler, KubeRay's v1 autoscaler) the config's declaration stands in, and without one the most is unknown
    (nothing is refused); a cluster without an autoscaler holds what is up. A resource is never less than what is
    up now."""
    now = {k: float(v) for k, v in live.items()}
    if limits:
        bound, source = limits, "autoscaler"
    elif declared:
        bound, source = declared, "config"
    elif autoscaling:
        return Capacity(now, None, CAPACITY_SOURCES["unknown"])
    else:
        bound, source = {}, "static"
    most = {k: max(now.get(k, 0.0), float(bound.get(k, 0.0))) for k in set(now) | set(bound)}
    return Capacity(now, most, CAPACITY_SOURCES[source])


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler can provide (its node types x max workers), as the
    autoscaler reports it to the GCS (autoscaler v2 does); None when it reports nothing. Ray Train V2 reads the same
    record (``ray._private.state.state.get_max_resources_from_cluster_config``) before it starts a worker group;
    Ray 2.60 has no public API for it."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception as e:  # a Ray without this record: fall back to the config
        log.debug("no autoscaler limits: %s", e)
        return None
    return {k: float(v) for k, v in limits.items()} if limits else None


def autoscaler_running() -> bool:
    """Whether an autoscaler manages the cluster: the cluster launcher's and KubeRay's (v1) autoscaler publishes its
    report in the status that ``ray status`` reads; a cluster started without one publishes no such report."""
    import json

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception as e:
        log.debug("no autoscaling status: %s", e)
        return False
    return bool(raw) and "autoscaler_report" in json.loads(raw)


def cluster_capacity(declared: dict[str, float] | None = None) -> Capacity:
    """:func:`capacity_from` for the connected cluster (Ray must be initialised)."""
    import ray

    return capacity_from(ray.cluster_resources(), autoscaler_limits(), declared, autoscaler_running())
