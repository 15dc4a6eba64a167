"""The cluster definitions in cluster/ are checked by the tools that will read them, without a cloud or Kubernetes:

- the Ray cluster-launcher YAML by Ray's own validation (``prepare_config`` + ``validate_config`` against the installed
  ``ray/autoscaler/ray-schema.json``, what ``ray up`` runs before touching a provider), and its ``ray start`` lines by
  Ray's own CLI parser;
- the KubeRay manifests against the fields the RayCluster/RayJob CRDs require (a checked-in schema subset,
  cluster/schemas/, with its sources) plus the operator-side rules of KubeRay's validation.go;
- the MLflow server definition by the installed ``mlflow server`` CLI parser;
- every job a manifest or docs/cluster.md names: the entrypoint script exists, calls the flow it claims, and its
  config validates with ``raysafe <flow> <config> --print-config`` (for every flow registered in raysafe.cli.FLOWS).

Each validator is also shown to reject broken copies, so these tests can fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from raysafe.cli import FLOWS, main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
KUBERAY = CLUSTER / "kuberay"
SCHEMA = CLUSTER / "schemas" / "kuberay-v1.subset.schema.json"
RAY_MANIFESTS = sorted(KUBERAY.glob("ray*.yaml"))
RAYJOBS = sorted(KUBERAY.glob("rayjob-*.yaml"))
DOCS = ROOT / "docs" / "cluster.md"

# Secrets the manifests may reference (each is created by a command in docs/cluster.md).
KNOWN_SECRETS = {
    "raysafe-ray-token",
    "raysafe-hf",
    "raysafe-mlflow-client",
    "raysafe-s3",
    "mlflow-db",
    "mlflow-s3",
    "mlflow-auth",
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


# ------------------------------------------------------------------------------------------- cluster launcher
def ray_validate(cfg: dict) -> dict:
    """What `ray up` does to a config before it contacts the provider: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_schema_is_the_installed_one():
    import ray.autoscaler

    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema.is_file(), f"Ray {__import__('ray').__version__} has no {schema}: the launcher test needs updating"
    assert "available_node_types" in json.loads(schema.read_text())["properties"]


def test_launcher_yaml_passes_ray_validation():
    cfg = load(LAUNCHER)
    prepared = ray_validate(cfg)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert head["resources"].get("GPU", 0) == 0, "GPU work must not land on the head"
    assert gpu_types, "no worker type offers GPUs"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, f"{name} should autoscale from zero"
        assert t["max_workers"] <= prepared["max_workers"]


def test_launcher_start_commands_parse_and_stay_private():
    from ray.scripts.scripts import start

    cfg = load(LAUNCHER)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        ray_lines = [c.split(";")[-1].strip() for c in cfg[key] if "ray start" in c]
        assert ray_lines, f"{key} starts no Ray"
        for line in ray_lines:
            argv = shlex.split(line.replace("$RAY_HEAD_IP", "10.0.0.1"))
            ctx = start.make_context("start", argv[2:])  # raises click.UsageError on a misspelt flag
            if key == "head_start_ray_commands":
                assert ctx.params["dashboard_host"] == "127.0.0.1", "the job API must not listen on public interfaces"
    run_options = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    assert any("auth_token" in k for k in cfg["file_mounts"]), "the token must reach every node"
    assert "/mnt/shared:/mnt/shared" in run_options


def test_launcher_installs_the_pinned_torch_and_raysafe():
    cfg = load(LAUNCHER)
    readme_pin = re.search(r"pip install (torch==[\d.]+)", (ROOT / "README.md").read_text()).group(1)
    setup = " ".join(cfg["setup_commands"])
    assert readme_pin in setup and "/home/ray/raysafe" in setup
    assert cfg["file_mounts"]["/home/ray/raysafe"] == "."


@pytest.mark.parametrize(
    "breakage",
    ["gpu_count_as_string", "unknown_head_type", "misspelt_top_level", "min_over_max_workers", "missing_node_config"],
)
def test_broken_launcher_yaml_fails_ray_validation(breakage):
    cfg = load(LAUNCHER)
    workers = cfg["available_node_types"]["ray.worker.gpu"]
    if breakage == "gpu_count_as_string":
        workers["resources"]["GPU"] = "one"
    elif breakage == "unknown_head_type":
        cfg["head_node_type"] = "ray.head.gpu"
    elif breakage == "misspelt_top_level":
        cfg["max_worker"] = cfg.pop("max_workers")
    elif breakage == "min_over_max_workers":
        workers["min_workers"] = cfg["max_workers"] + 1
    elif breakage == "missing_node_config":
        del workers["node_config"]
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_validate(cfg)


# ----------------------------------------------------------------------------------------------- KubeRay CRDs
@pytest.fixture(scope="module")
def crd_validator():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["x-source"]["files"], "the schema subset must name its sources"
    return jsonschema.Draft7Validator(schema)


def crd_errors(validator, doc) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def cluster_specs(doc: dict) -> list[dict]:
    return [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"]["rayClusterSpec"]]


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def test_manifests_exist():
    names = {p.name for p in RAY_MANIFESTS}
    assert {"raycluster.yaml", "rayjob-extract.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml"} <= names


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd_required_fields(path, crd_validator):
    doc = load(path)
    assert crd_errors(crd_validator, doc) == []


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_follows_operator_rules(path):
    """Rules KubeRay's validation.go applies beyond the CRD schema, and raysafe's own deployment rules."""
    from ray.scripts.scripts import start

    ray_start_flags = {o.lstrip("-") for p in start.params for o in p.opts}
    doc = load(path)
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "one of rayClusterSpec or clusterSelector"
        assert spec.get("activeDeadlineSeconds", 1) > 0 and spec.get("backoffLimit", 0) >= 0
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            # The submitter pod runs `ray job submit` against the token-protected job API.
            submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
            assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= {e["name"] for e in submitter["env"]}
    for cspec in cluster_specs(doc):
        assert cspec["rayVersion"] == __import__("ray").__version__, "cluster Ray must match the clients' Ray"
        assert cspec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "dashboard must stay private"
        for group in cspec.get("workerGroupSpecs", []):
            lo, hi = group["minReplicas"], group["maxReplicas"]
            assert 0 <= lo <= group.get("replicas", lo) <= hi, f"{group['groupName']}: replicas out of [min, max]"
        for name, tmpl in pod_templates(cspec):
            params = (
                cspec["headGroupSpec"]["rayStartParams"]
                if name == "head"
                else next(g["rayStartParams"] for g in cspec["workerGroupSpecs"] if g["groupName"] == name)
            )
            unknown = set(params) - ray_start_flags
            assert not unknown, f"{path.name} {name}: rayStartParams {unknown} are not `ray start` options"
            ray_container = tmpl["spec"]["containers"][0]
            env = {e["name"]: e for e in ray_container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", f"{path.name} {name}: token auth off"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "raysafe-ray-token"
            assert "MLFLOW_TRACKING_URI" in env and "HF_TOKEN" in env
            mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in tmpl["spec"]["volumes"]}
            assert claims[mounts["/mnt/shared"]] == load(KUBERAY / "shared-pvc.yaml")["metadata"]["name"]
            if name != "head":
                gpus = ray_container["resources"]["limits"].get("nvidia.com/gpu")
                assert gpus and int(gpus) >= 1, f"{path.name} {name}: GPU workers without nvidia.com/gpu"
        if cspec.get("enableInTreeAutoscaling"):
            auto_env = {e["name"] for e in cspec["autoscalerOptions"]["env"]}
            assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= auto_env, "the autoscaler must authenticate too"
    refs = re.findall(r"secretKeyRef: \{name: ([\w-]+)|secretRef: \{name: ([\w-]+)", path.read_text())
    assert {a or b for a, b in refs} <= KNOWN_SECRETS


def broken(doc: dict, how: str) -> dict:
    doc = copy.deepcopy(doc)
    cspec = cluster_specs(doc)[0]
    group = cspec["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    if how == "no_head_group":
        del cspec["headGroupSpec"]
    elif how == "no_group_name":
        del group["groupName"]
    elif how == "no_max_replicas":
        del group["maxReplicas"]
    elif how == "misspelt_field":
        group["minReplica"] = group.pop("minReplicas")
    elif how == "bad_quantity":
        container["resources"]["limits"]["memory"] = "64GB"
    elif how == "env_without_name":
        container["env"].append({"value": "x"})
    elif how == "no_containers":
        group["template"]["spec"]["containers"] = []
    elif how == "wrong_api_version":
        doc["apiVersion"] = "ray.io/v1alpha1"
    elif how == "name_too_long":
        doc["metadata"]["name"] = "raysafe-" + "x" * 60
    elif how == "replicas_as_string":
        group["replicas"] = "8"
    return doc


@pytest.mark.parametrize(
    "how",
    [
        "no_head_group",
        "no_group_name",
        "no_max_replicas",
        "misspelt_field",
        "bad_quantity",
        "env_without_name",
        "no_containers",
        "wrong_api_version",
        "name_too_long",
        "replicas_as_string",
    ],
)
@pytest.mark.parametrize("path", [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob-train.yaml"], ids=lambda p: p.name)
def test_broken_manifest_fails_crd_check(path, how, crd_validator):
    assert crd_errors(crd_validator, broken(load(path), how)), f"{how} was not caught"


# ------------------------------------------------------------------------------------------- jobs and configs
def flow_of_script(script: Path) -> str:
    """The flow a jobs/ entrypoint runs: the first argument it passes to raysafe.cli.main."""
    m = re.search(r"main\(\[\s*\"(\w+)\"", script.read_text())
    assert m, f'{script} does not call raysafe.cli.main(["<flow>", ...])'
    return m.group(1)


def check_job_command(argv: list[str], claimed_flow: str | None = None) -> None:
    """`python jobs/X.py CONFIG [--set k=v ...]`: script exists, runs a registered flow, config validates."""
    assert argv[0] == "python" and argv[1].startswith("jobs/"), f"not a jobs/ entrypoint: {argv}"
    script, rest = ROOT / argv[1], argv[2:]
    assert script.is_file(), f"{argv[1]} does not exist"
    flow = flow_of_script(script)
    assert flow in FLOWS, f"{argv[1]} runs flow {flow!r}, which raysafe.cli does not register"
    if claimed_flow is not None:
        assert flow == claimed_flow, f"{argv[1]} runs {flow!r}, the manifest says {claimed_flow!r}"
    config = rest[0]
    assert (ROOT / config).is_file(), f"config {config} does not exist"
    # Exactly `raysafe <flow> <config> --print-config [--set ...]`, from the repository root like a job's cwd.
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main([flow, *rest, "--print-config"]) == 0, f"raysafe {flow} {config} --print-config failed"
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_and_config_validate(path, capsys):
    doc = load(path)
    flow = doc["metadata"]["annotations"]["raysafe.io/flow"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    if flow not in FLOWS:
        # A flow still being added elsewhere: the manifest is checked for structure only until it is registered.
        assert flow in {"separation", "concepts", "evaluate", "sweep", "study"}, f"unknown flow {flow!r}"
        pytest.skip(
            f"{path.name}: flow {flow!r} is not registered in raysafe.cli.FLOWS yet; "
            f"{argv[1]} and {argv[2]} are checked once it is"
        )
    check_job_command(argv, flow)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed, "--print-config printed nothing"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_runtime_env_is_valid(path):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(load(path)["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict) and set(env) <= RuntimeEnv.known_fields
    working_dir = env.pop("working_dir")
    assert working_dir == "/home/ray/raysafe", (
        "the image keeps the repository at /home/ray/raysafe (cluster/Dockerfile)"
    )
    RuntimeEnv(**env)  # type-checks env_vars (str -> str), excludes (list) ...


def test_every_job_tracks_to_the_mlflow_service():
    svc = next(d for d in load_all(CLUSTER / "mlflow" / "mlflow.yaml") if d["kind"] == "Service")
    port = svc["spec"]["ports"][0]["port"]
    for path in RAY_MANIFESTS:
        for cspec in cluster_specs(load(path)):
            for _, tmpl in pod_templates(cspec):
                env = {e["name"]: e.get("value") for e in tmpl["spec"]["containers"][0]["env"]}
                assert env["MLFLOW_TRACKING_URI"] == f"http://{svc['metadata']['name']}:{port}"


def test_job_command_check_rejects_missing_script_config_and_bad_override(capsys):
    with pytest.raises(AssertionError, match="does not exist"):
        check_job_command(["python", "jobs/no_such_flow.py", "jobs/configs/extract_cluster.yaml"])
    with pytest.raises(AssertionError, match="config jobs/configs/nope.yaml does not exist"):
        check_job_command(["python", "jobs/extract.py", "jobs/configs/nope.yaml"])
    with pytest.raises(AssertionError, match="--print-config failed"):
        check_job_command(
            ["python", "jobs/extract.py", "jobs/configs/extract_cluster.yaml", "--set", "extract.store_dtype=int8"]
        )
    assert "extract.store_dtype = 'int8'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- runtime env
def test_runtime_env_file_is_valid_and_ships_no_environment():
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields
    assert "working_dir" not in env, "the working dir comes from --working-dir on the command line"
    RuntimeEnv(**env)
    assert {".git", ".venv", "outputs", "mlruns", "mlartifacts", "mlflow.db"} <= set(env["excludes"])


# ---------------------------------------------------------------------------------------------- MLflow server
def mlflow_args(container: dict, env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def test_mlflow_server_definition():
    from mlflow.cli import server

    docs = {d["kind"]: d for d in load_all(CLUSTER / "mlflow" / "mlflow.yaml")}
    dep, svc, netpol = docs["Deployment"], docs["Service"], docs["NetworkPolicy"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        svc["spec"]["selector"].items() <= labels.items()
        and netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    )
    assert svc["spec"]["type"] == "ClusterIP"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert container["args"][0] == "server"
    # The installed MLflow's own CLI parser accepts the flags (a misspelt or removed flag raises here).
    ctx = server.make_context(
        "server", mlflow_args(container, {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db/mlflow"})[1:]
    )
    p = ctx.params
    assert p["backend_store_uri"].startswith("postgresql") and p["serve_artifacts"]
    assert p["artifacts_destination"].startswith("s3://") and p["app_name"] == "basic-auth"
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = [h.strip() for h in p["allowed_hosts"].split(",")]
    for host in ("mlflow:5000", "mlflow.raysafe.svc.cluster.local:5000", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(hosts, host), f"clients calling {host} would be refused"
    assert not is_allowed_host_header(hosts, "evil.example.com")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    refs = re.findall(
        r"secretKeyRef: \{name: ([\w-]+)|secretRef: \{name: ([\w-]+)|secretName: ([\w-]+)",
        (CLUSTER / "mlflow" / "mlflow.yaml").read_text(),
    )
    assert {a or b or c for a, b, c in refs} <= KNOWN_SECRETS


def test_mlflow_definition_check_catches_a_misspelt_flag():
    import click
    from mlflow.cli import server

    with pytest.raises(click.UsageError):
        server.make_context("server", ["--artifact-destination=s3://x"])


def test_nothing_is_exposed_outside_the_cluster():
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for doc in load_all(path):
            assert doc.get("kind") not in ("Ingress", "Route"), f"{path}: no unauthenticated ingress"
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path}: Service must be ClusterIP"
            spec = doc.get("spec") or {}
            for cspec in (
                [spec]
                if doc.get("kind") == "RayCluster"
                else [spec.get("rayClusterSpec")]
                if doc.get("kind") == "RayJob"
                else []
            ):
                assert not cspec["headGroupSpec"].get("enableIngress"), f"{path}: enableIngress exposes the dashboard"


# ------------------------------------------------------------------------------------------------ versions
def test_images_match_the_installed_ray():
    import ray

    tag = f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert f"FROM {tag}" in (CLUSTER / "Dockerfile").read_text()
    assert load(LAUNCHER)["docker"]["image"] == tag
    import mlflow

    assert f"mlflow[auth]=={mlflow.__version__}" in (CLUSTER / "mlflow" / "Dockerfile").read_text()


# ----------------------------------------------------------------------------------------------------- docs
def doc_job_commands() -> list[list[str]]:
    text = DOCS.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if "ray job submit" in line and " -- " in line:
            entry = line.split(" -- ", 1)[1].split("#")[0].strip().rstrip("`")
            out.append(shlex.split(entry))
    return out


def test_docs_submit_lines_name_real_jobs_and_valid_configs(capsys):
    commands = doc_job_commands()
    flows_in_docs = {flow_of_script(ROOT / c[1]) for c in commands if (ROOT / c[1]).is_file()}
    # Every registered flow whose cluster config exists (its header names the jobs/ script) has a submit line.
    scripts = {flow_of_script(p): p for p in (ROOT / "jobs").glob("*.py")}
    cluster_configs = [p.read_text() for p in (ROOT / "jobs" / "configs").glob("*cluster*.yaml")]
    expected = {"extract", "train"} | {
        flow
        for flow, script in scripts.items()
        if flow in FLOWS and any(f"jobs/{script.name}" in c for c in cluster_configs)
    }
    assert expected <= flows_in_docs, f"docs/cluster.md shows no submit line for {expected - flows_in_docs}"
    for argv in commands:
        check_job_command(argv)
    text = DOCS.read_text(encoding="utf-8")
    assert "--runtime-env cluster/runtime_env.yaml" in text
    for ref in set(re.findall(r"cluster/[\w./-]+\.(?:yaml|json)|cluster/[\w./-]*Dockerfile", text)):
        assert (ROOT / ref).exists(), f"docs/cluster.md names {ref}, which does not exist"
