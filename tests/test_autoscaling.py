"""Training and a sweep on a Ray cluster that scales from zero (issue 22 items 2 and 3).

The cluster is Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER``, what ``ray.cluster_utils.AutoscalingCluster``
starts): a head with 0 CPUs and one node type of 2 CPUs, max 2 workers, none up at the start. Its autoscaler (the
cluster launcher's default one) reports no node-type limits to the GCS, so the configs declare ``ray.capacity``.
``AutoscalingCluster.start`` itself runs ``ray stop --force`` (every Ray instance of this user on the machine) and
reads a YAML that the Ray wheel does not ship, so the fixture starts the same cluster on its own port and temporary
directory and, at the end, stops only the processes that run from that directory.

The sweep's trials train 2 steps with a checkpoint only at step 2: Tune must see step 1 with all its metrics as
that step ends (Train reports every step to Tune). Polling checkpoints, as the trials did before, learnt of step 1
only from step 2's checkpoint, after the fact, and with its two losses alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raysafe.config import load_config
from raysafe.errors import ConfigError
from raysafe.runtime import CAPACITY_SOURCES, capacity_from, cluster_capacity

NODE_CPUS, MAX_NODES = 2, 2
CAPACITY = {"CPU": float(NODE_CPUS * MAX_NODES)}


def test_capacity_is_the_autoscalers_limit_else_the_declared_one_never_below_what_is_up():
    live = {"CPU": 2.0, "memory": 8e9}
    cap = capacity_from(live, {"CPU": 64.0, "GPU": 16.0}, {"CPU": 8.0}, autoscaling=True)
    assert cap.most == {"CPU": 64.0, "GPU": 16.0, "memory": 8e9} and cap.source == CAPACITY_SOURCES["autoscaler"]
    assert cap.shortfall({"CPU": 8, "GPU": 16}) == [] and cap.waits_for_nodes({"CPU": 8})
    assert cap.shortfall({"GPU": 32}) == ["32 GPUs (it can hold 16)"]
    cap = capacity_from(live, None, {"CPU": 1.0, "GPU": 8.0}, autoscaling=True)  # no limits reported: the config's
    assert cap.most["CPU"] == 2.0 and cap.most["GPU"] == 8.0 and cap.source == CAPACITY_SOURCES["config"]
    cap = capacity_from(live, None, None, autoscaling=True)  # an autoscaler, no limits, nothing declared: unknown
    assert cap.most is None and cap.shortfall({"GPU": 64}) == [] and "at most unknown" in cap.describe()
    cap = capacity_from(live, {}, None)  # no autoscaler: what is up is all there is
    assert cap.most == live and cap.shortfall({"GPU": 1}) == ["1 GPUs (it can hold 0)"]
    assert not cap.waits_for_nodes({"CPU": 2})
    assert "now 2 CPU, 0 GPU; at most 2 CPU, 0 GPU" in cap.describe()


# ------------------------------------------------------------------------------------------------ the cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_under(path: str) -> list[int]:
    """Processes whose command line names ``path`` (every process of a Ray cluster names its temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if path in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return [p for p in out if p != os.getpid()]


def _stop(path: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_under(path):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _pids_under(path) and time.time() < deadline:
            time.sleep(0.5)


def _fake_cluster_config(gcs: str) -> dict:
    """The fake multi-node provider's cluster config (Ray's fake_multi_node/example.yaml, which the wheel lacks)."""
    return {
        "cluster_name": "raysafe-autoscaling-test",
        "max_workers": MAX_NODES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_node": {
                "resources": {"CPU": NODE_CPUS},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        "auth": {},
    }


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="rsas", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    ip = ray._private.services.get_node_ip_address()
    gcs = f"{ip}:{port}"
    cfg_path = Path(tmp, "autoscaling.json")
    cfg_path.write_text(json.dumps(_fake_cluster_config(gcs)))
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a token in ~/.ray would otherwise switch the head to token auth
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run(
            [ray_cli, "start", "--head", f"--port={port}", f"--temp-dir={tmp}", "--num-cpus=0"]
            + [f"--autoscaling-config={cfg_path}", "--include-dashboard=false"],
            env=env,
            check=True,
            capture_output=True,
        )
        ray.init(address=gcs, log_to_driver=False)
        from raysafe.runtime import autoscaler_running

        deadline = time.time() + 60  # the autoscaler publishes its first status after its first update loop
        while not autoscaler_running() and time.time() < deadline:
            time.sleep(0.5)
        yield gcs
    finally:
        ray.shutdown()
        _stop(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _train_tree(model_dir, tmp_path, steps: int = 2, every: int = 2) -> dict:
    return {
        "model": {"path": str(model_dir), "name": "tiny"},
        "precompute_reference": "off",
        "data": {
            "max_length": 96,
            "max_prompt_length": 64,
            "pairs": {"kind": "fixture", "name": "preference_pairs", "limit_per_lang": 2},
        },
        "mixture": {"languages": ["en", "zh"], "m": 2},
        "mlc": {"weight": 0.8, "layer": 2, "d": 16, "every_k": 1},
        "optim": {"lr": 1e-3, "epochs": steps, "micro_batch": 2, "grad_accum": 1, "max_steps": steps},
        "deepspeed": {"zero_stage": 1},
        "checkpoint": {"storage_path": str(tmp_path / "train"), "every_n_steps": every, "keep": 1},
        "ray": {"num_workers": 1, "torch_threads": 1, "capacity": CAPACITY},
        "tracking": {"enabled": False},
    }


@pytest.mark.slow
def test_training_starts_on_a_cluster_with_no_workers_up_and_the_cluster_scales_up(
    autoscaling_cluster, tiny_llama_dir, tmp_path
):
    import ray

    from raysafe.train.config import TrainConfig
    from raysafe.train.flow import run_train

    assert ray.cluster_resources().get("CPU", 0) == 0  # nothing to train on yet
    cap = cluster_capacity(CAPACITY)
    assert cap.most["CPU"] == 4 and cap.source == CAPACITY_SOURCES["config"]
    assert cluster_capacity(None).source == CAPACITY_SOURCES["unknown"]  # this autoscaler reports no limits

    # more than even the full cluster holds: refused before anything starts, naming what it can hold
    tree = _train_tree(tiny_llama_dir, tmp_path)
    too_big = load_config(TrainConfig, data={**tree, "ray": {**tree["ray"], "num_workers": 3, "cpus_per_worker": 2}})
    with pytest.raises(ConfigError, match=r"3 train worker\(s\) need 6 CPUs \(it can hold 4\)") as e:
        run_train(too_big, progress=False)
    assert "ray.capacity" in str(e.value) and not (tmp_path / "train").exists()

    res = run_train(load_config(TrainConfig, data={**tree, "optim": {**tree["optim"], "max_steps": 1}}), progress=False)
    assert res.steps == 1 and (res.model_dir / "config.json").exists()
    assert ray.cluster_resources().get("CPU", 0) >= NODE_CPUS  # the autoscaler added a node for the workers


@pytest.mark.slow
def test_sweep_on_the_autoscaling_cluster_reports_every_training_step_to_tune(
    autoscaling_cluster, tiny_llama_dir, tmp_path, mlflow_local
):
    from mlflow import MlflowClient

    from raysafe.sweep.config import SweepConfig
    from raysafe.sweep.flow import run_sweep

    train = _train_tree(tiny_llama_dir, tmp_path)  # 2 steps, one checkpoint: at step 2
    train["tracking"] = {"experiment": "test-autoscaling-train"}
    tree = {
        "name": "autoscale",
        "output_dir": str(tmp_path / "sweeps"),
        "train": train,
        "space": {"lr": [1e-3, 1e-4]},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "evaluation": {"enabled": False},
        "objective": {
            "primary": {"metric": "train_loss_align", "mode": "min"},
            "pareto": [{"metric": "train_loss_align", "mode": "min"}, {"metric": "train_loss_total", "mode": "min"}],
        },
        "ray": {"capacity": CAPACITY},
        "tracking": {"experiment": "test-autoscaling"},
    }
    res = run_sweep(load_config(SweepConfig, data=tree), progress=False)
    assert res.table.height == 2 and set(res.table["status"]) == {"finished"}, res.summary()
    client = MlflowClient(mlflow_local)
    for trial_id, run_id in zip(res.table["trial_id"], res.table["mlflow_run_id"]):
        rows = (res.sweep_dir / "tune" / f"trial_{trial_id}" / "result.json").read_text().splitlines()
        results = [json.loads(x) for x in rows]
        # every step reached Tune (what ASHA sees): 1 while training ran, 2 with the final result
        assert [r["train_step"] for r in results] == [1.0, 2.0]
        assert [r["final"] for r in results] == [0.0, 1.0]
        # step 1 came with every metric of its step, not only the losses a later checkpoint's record would give
        assert {"train_loss_align", "train_lr", "train_align_rewards_margins", "train_step_time_s"} <= set(results[0])
        assert [m.step for m in client.get_metric_history(run_id, "train_loss_align")] == [1, 2]
