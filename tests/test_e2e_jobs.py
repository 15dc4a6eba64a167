"""End to end, the way jobs run on a cluster: a real local Ray cluster (`ray start --head` on loopback, token
authentication on, plus a second worker node when the machine has the cores) and a real `mlflow server` (SQLite
backend, local artifact root, loopback), jobs submitted with `ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- python jobs/...` exactly as docs/cluster.md shows, and their status, logs, outputs and
MLflow runs/artifacts checked through Ray's job client and `mlflow.MlflowClient`.

Both services run in a private temp dir on free ports and are stopped by PID in the fixture's teardown, even when a
test fails: never `ray stop`, which would also stop other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv: `ray`, `mlflow` and the `python` jobs run with
EXPERIMENT = "raysafe-e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last})")


def processes_of(*markers: str):
    """Every process whose command line names one of ``markers`` (our private temp dir, our GCS address), with all
    its descendants."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and any(m in cmd for m in markers):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def stop_processes(*markers: str) -> list[int]:
    """Terminate, then kill, what :func:`processes_of` finds; returns the PIDs that survived (should be none)."""
    import psutil

    procs = processes_of(*markers)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return [p.pid for p in processes_of(*markers)]


@dataclass
class Services:
    tmp: Path
    dashboard: str  # http://127.0.0.1:PORT, the job API
    mlflow: str  # http://127.0.0.1:PORT
    env: dict  # environment of the `ray` CLI calls (token auth, the venv first on PATH)
    token: str
    nodes: int

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, *entrypoint: str, timeout: float = 300) -> "Job":
        """`ray job submit --address … --working-dir . --runtime-env cluster/runtime_env.yaml -- python …`, waiting."""
        sid = f"raysafe-e2e-{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        client = self.client()
        try:
            proc = self.ray_cli(
                "job",
                "submit",
                "--address",
                self.dashboard,
                "--submission-id",
                sid,
                "--working-dir",
                ".",
                "--runtime-env",
                "cluster/runtime_env.yaml",
                "--",
                "python",
                *entrypoint,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            client.stop_job(sid)
            raise AssertionError(
                f"job {sid} still running after {timeout:.0f}s (stopped it); its log:\n"
                f"{client.get_job_logs(sid)[-6000:]}"
            ) from None
        seconds = time.monotonic() - t0
        try:
            info = client.get_job_info(sid)
        except Exception as e:  # the submission itself failed: show what `ray job submit` said
            raise AssertionError(
                f"job {sid} was not submitted ({e}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            ) from e
        return Job(sid, proc, str(info.status), info.message or "", client.get_job_logs(sid), seconds)


@dataclass
class Job:
    sid: str
    submit: subprocess.CompletedProcess
    status: str
    message: str
    logs: str
    seconds: float

    def explain(self) -> str:
        return (
            f"job {self.sid}: {self.status} ({self.message}) after {self.seconds:.0f}s\n--- job logs ---\n"
            f"{self.logs[-6000:]}\n--- ray job submit stderr ---\n{self.submit.stderr[-3000:]}"
        )


def start_ray_node(env: dict, tmp: Path, *, head: bool, gcs_port: int, dashboard_port: int | None, cpus: int):
    args = [
        str(BIN / "ray"),
        "start",
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        str(cpus),
        "--num-gpus",
        "0",
        "--disable-usage-stats",
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
    ]
    if head:
        args += [
            "--head",
            "--port",
            str(gcs_port),
            "--temp-dir",
            str(tmp / "ray"),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--include-dashboard",
            "true",
        ]
    else:
        args += ["--address", f"127.0.0.1:{gcs_port}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


@pytest.fixture(scope="module")
def services():
    import ray
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        pytest.fail(
            f"the Ray job API (the dashboard) cannot start in this environment: {missing}. "
            f"Install Ray's dashboard extra: pip install 'ray[default]=={ray.__version__}' "
            "(raysafe's dependencies should name ray[default,train,data,tune])",
            pytrace=False,
        )
    # A short private directory: Ray's Unix socket paths live under it and must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="rs-e2e-", dir="/tmp"))
    token = secrets.token_hex(32)
    (tmp / "auth_token").write_text(token)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")
    }
    mlflow_url = f"http://127.0.0.1:{free_port()}"
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint = this venv's python
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"),
            "MLFLOW_TRACKING_URI": mlflow_url,  # what the cluster's pods get from their env
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    mlflow_log = open(tmp / "mlflow-server.log", "w")
    mlflow_proc = None
    gcs_port, dash_port = free_port(), free_port()
    try:
        mlflow_proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp}/mlflow.db",
                "--artifacts-destination",
                str(tmp / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                mlflow_url.rsplit(":", 1)[1],
                "--workers",
                "1",
            ],
            # No background job runner (GenAI features, 7 more processes): this server only tracks runs.
            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            cwd=tmp,
            stdout=mlflow_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        start_ray_node(env, tmp, head=True, gcs_port=gcs_port, dashboard_port=dash_port, cpus=2)
        nodes = 1
        # A second node (its own raylet and workers) when the machine has cores to spare, or when asked to.
        if (os.cpu_count() or 1) >= 4 or os.environ.get("RAYSAFE_E2E_SECOND_NODE") == "1":
            start_ray_node(env, tmp, head=False, gcs_port=gcs_port, dashboard_port=None, cpus=1)
            nodes = 2
        dashboard = f"http://127.0.0.1:{dash_port}"
        wait_http(f"{dashboard}/api/version", 90, {"Authorization": f"Bearer {token}"})
        wait_http(f"{mlflow_url}/health", 120)
        yield Services(tmp, dashboard, mlflow_url, env, token, nodes)
    finally:
        survivors = stop_processes(str(tmp), f"127.0.0.1:{gcs_port}")
        if mlflow_proc is not None and mlflow_proc.poll() is None:
            os.killpg(mlflow_proc.pid, 9)
            mlflow_proc.wait(10)
        mlflow_log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"processes of the test cluster survived teardown: {survivors}"


@pytest.fixture(scope="module")
def tiny_model(services):
    from raysafe.models.tiny import save_tiny

    return save_tiny(services.tmp / "models" / "tiny-llama", "llama")


def extract_config(services, tiny_model, name: str) -> Path:
    cfg = {
        "models": [{"name": "tiny-llama", "path": str(tiny_model)}],
        "data": {"kind": "fixture", "name": "safety_prompts", "languages": ["en", "zh", "ar"], "limit_per_lang": 8},
        "output_dir": str(services.tmp / "activations" / name),
        "extract": {"layers": [1, 4], "positions": ["last", "mean"], "shard_rows": 8, "max_length": 64},
        "ray": {"num_actors": 1, "num_cpus_per_actor": 1, "torch_threads": 1, "tokenize_cpus": 0.5},
        "tracking": {"experiment": EXPERIMENT},
    }
    path = services.tmp / f"extract-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def extract_job(services, tiny_model):
    cfg = extract_config(services, tiny_model, "main")
    return cfg, services.submit("jobs/extract.py", str(cfg))


def test_job_api_refuses_requests_without_the_token(services):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{services.dashboard}/api/jobs/", timeout=10)
    assert e.value.code in (401, 403)
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{services.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {services.token}"}
        ),
        timeout=10,
    ) as r:
        assert r.status == 200


def test_cluster_is_up_with_its_nodes(services):
    # Ray's state API (what `ray list nodes` calls), with the token.
    req = urllib.request.Request(
        f"{services.dashboard}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {services.token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        nodes = json.loads(r.read())["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == services.nodes
    assert sum(n["resources_total"].get("CPU", 0) for n in alive) == 2 + (services.nodes - 1)


def test_extract_job_succeeds_with_outputs_and_mlflow_run(services, extract_job):
    from mlflow import MlflowClient

    from raysafe.extract.store import ActivationStore

    cfg_path, job = extract_job
    assert job.status == "SUCCEEDED" and job.submit.returncode == 0, job.explain()
    assert "tiny-llama: 3/3 shards extracted now" in job.logs, job.explain()
    out = Path(yaml.safe_load(cfg_path.read_text())["output_dir"])
    store = ActivationStore(out)
    manifest = store.manifest()
    assert manifest["rows"] == 24 and manifest["rows_per_lang"] == {"ar": 8, "en": 8, "zh": 8}
    assert store.done_shards("tiny-llama") == {0, 1, 2}
    for layer in (1, 4):
        for position in ("last", "mean"):
            meta, x = store.read_layer("tiny-llama", layer, position)
            assert x.shape == (24, 64) and meta["lang"].n_unique() == 3
    assert not [p for p in out.rglob(".*")], "temporary files left in the store"

    client = MlflowClient(tracking_uri=services.mlflow)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.`raysafe.flow` = 'extract'")
    run = next(r for r in runs if r.info.run_id in job.logs)  # the summary line names the run
    assert run.info.status == "FINISHED"
    assert run.data.metrics["rows_en"] == 8 and run.data.metrics["tiny-llama.shards_extracted"] == 3
    assert run.data.metrics["tiny-llama.tokens_per_s"] > 0
    assert run.data.params["output_dir"] == str(out)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"manifest.json", "config.yaml"}
    # The artifact comes back through the server's artifact proxy, identical to the file on disk.
    (services.tmp / "dl").mkdir(exist_ok=True)
    local = client.download_artifacts(run.info.run_id, "manifest.json", str(services.tmp / "dl"))
    assert json.loads(Path(local).read_text()) == manifest


def test_resubmit_resumes_and_fallback_logs_locally_and_says_so(services, extract_job):
    """Same job again with the tracking server unreachable but fallback_to_local: nothing to redo, runs logged
    locally, and the log says where."""
    from mlflow import MlflowClient

    cfg_path, first = extract_job
    assert first.status == "SUCCEEDED", first.explain()
    dead = f"http://127.0.0.1:{free_port()}"
    job = services.submit(
        "jobs/extract.py",
        str(cfg_path),
        "--set",
        f"tracking.tracking_uri={dead}",
        "--set",
        "tracking.fallback_to_local=true",
    )
    assert job.status == "SUCCEEDED", job.explain()
    assert "tiny-llama: 0/3 shards extracted now" in job.logs, job.explain()
    assert f"MLflow server {dead} unreachable" in job.logs
    line = next(ln for ln in job.logs.splitlines() if "logging to the local store sqlite:///" in ln)
    db = line.split("local store sqlite:///", 1)[1].split(" ", 1)[0]
    assert Path(db).is_file(), f"the local store named in the log does not exist: {db}"
    local = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = local.search_runs([local.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert any(r.info.run_id in job.logs for r in runs)


def test_mlflow_down_fails_fast_naming_the_uri(services, tiny_model):
    cfg = extract_config(services, tiny_model, "down")
    dead = f"http://127.0.0.1:{free_port()}"
    job = services.submit("jobs/extract.py", str(cfg), "--set", f"tracking.tracking_uri={dead}", timeout=180)
    assert job.status == "FAILED" and job.submit.returncode != 0, job.explain()
    assert f"MLflow tracking server {dead} is unreachable" in job.logs, job.explain()
    assert "tracking.fallback_to_local=true" in job.logs and "Traceback" not in job.logs
    assert "exit code 2" in job.message
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    # Nothing that claims completion, nothing half-written: a re-run starts from the validated inputs.
    assert not (out / "manifest.json").exists() and not list(out.rglob("_done/*"))
    assert not [p for p in out.rglob(".*")]


def test_broken_config_fails_fast_with_the_error_in_the_job_logs(services, tiny_model):
    cfg = extract_config(services, tiny_model, "broken")
    job = services.submit("jobs/extract.py", str(cfg), "--set", "extract.store_dtype=int8", timeout=180)
    assert job.status == "FAILED" and job.submit.returncode != 0, job.explain()
    assert "exit code 2" in job.message
    logs = services.ray_cli("job", "logs", job.sid, "--address", services.dashboard).stdout  # as a user reads them
    assert "extract.store_dtype = 'int8'" in logs and "'float16' or 'float32'" in logs, logs
    assert "where:" in logs and "fix:" in logs and "Traceback" not in logs
    assert not Path(yaml.safe_load(cfg.read_text())["output_dir"]).exists(), "outputs written before validation"


def test_train_job_succeeds_with_checkpoint_and_mlflow_run(services, tiny_model):
    from mlflow import MlflowClient

    storage = services.tmp / "train"
    job = services.submit(
        "jobs/train.py",
        "jobs/configs/train_tiny.yaml",
        "--set",
        f"model.path={tiny_model}",
        "--set",
        "optim.max_steps=2",
        "--set",
        "checkpoint.every_n_steps=1",
        "--set",
        f"checkpoint.storage_path={storage}",
        "--set",
        f"tracking.experiment={EXPERIMENT}",
        "--set",
        "ray.cpus_per_worker=0.5",
        timeout=400,
    )
    assert job.status == "SUCCEEDED" and job.submit.returncode == 0, job.explain()
    assert "trained 2 steps" in job.logs, job.explain()
    ckpt = Path(next(ln for ln in job.logs.splitlines() if ln.startswith("checkpoint: ")).split(": ", 1)[1])
    assert ckpt.is_dir() and storage in ckpt.parents and (ckpt / "train_config.yaml").is_file()
    client = MlflowClient(tracking_uri=services.mlflow)
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = next(
        r for r in client.search_runs([exp.experiment_id], "tags.`raysafe.flow` = 'train'") if r.info.run_id in job.logs
    )
    assert run.info.status == "FINISHED" and run.data.tags["raysafe.checkpoint"] == str(ckpt)
    assert any(k.startswith("loss") for k in run.data.metrics), run.data.metrics
    assert "train_config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
