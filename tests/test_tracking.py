"""The MLflow wrapper on a real SQLite store: how runs end, dataset inputs, system metrics, logging from a worker."""

from __future__ import annotations

import json

import pytest

from raysafe import tracking
from raysafe.config import SourceSpec, TrackingSpec


def _status(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.status


@pytest.mark.parametrize(
    "exc, status", [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED"), (SystemExit, "KILLED")]
)
def test_run_status_follows_how_the_block_ended(mlflow_local, exc, status):
    spec = TrackingSpec(experiment="t")
    ids = {}
    try:
        with tracking.run(spec, "parent") as parent:
            ids["parent"] = parent.info.run_id
            with tracking.run(spec, "child", parent_run_id=parent.info.run_id) as child:
                ids["child"] = child.info.run_id
                if exc is not None:
                    raise exc()
    except (ValueError, KeyboardInterrupt, SystemExit):
        pass
    # a stop (Ctrl-C, a scheduler's SystemExit) is not a failure: both runs say KILLED and a resume continues them
    assert _status(mlflow_local, ids["child"]) == status
    assert _status(mlflow_local, ids["parent"]) == status


def test_resumed_run_keeps_its_id_and_ends_killed_on_interrupt(mlflow_local):
    spec = TrackingSpec(experiment="t")
    with tracking.run(spec, "first") as r:
        rid = r.info.run_id
    with pytest.raises(KeyboardInterrupt):
        with tracking.run(spec, "again", resume_run_id=rid) as r2:
            assert r2.info.run_id == rid
            raise KeyboardInterrupt
    assert _status(mlflow_local, rid) == "KILLED"


def test_logging_without_tracking_does_not_import_mlflow(tmp_path):
    """With tracking off, the log calls are no-ops that leave mlflow (3 s to import) unimported."""
    import subprocess
    import sys

    f = tmp_path / "a.txt"
    f.write_text("x")
    code = (
        "import sys\nfrom raysafe import tracking\nfrom raysafe.config import SourceSpec, TrackingSpec\n"
        "with tracking.run(TrackingSpec(enabled=False), 'off') as r:\n"
        "    assert r is None\n"
        "    tracking.log_params({'a': 1}); tracking.log_metrics({'x': 1.0}); tracking.set_tags({'t': 'v'})\n"
        "    tracking.log_input('d', {'data': SourceSpec(name='safety_prompts')}, 'abc', 3, 'training')\n"
        "    w = tracking.attach(tracking.attach_info(TrackingSpec(enabled=False), r))\n"
        "    w.log_metrics({'x': 1.0}, step=1); w.close()\n"
        f"    tracking.log_artifact({str(f)!r})\n"
        "print('mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_log_input_records_source_digest_and_rows(mlflow_local):
    from mlflow import MlflowClient

    src = SourceSpec(kind="hub", path="textdetox/multilingual_toxicity_dataset", split="en")
    with tracking.run(TrackingSpec(experiment="t"), "in") as r:
        tracking.log_input("toxicity (prompt_variants)", {"data": src}, "0123abcd", 42, context="extraction")
    inputs = MlflowClient(mlflow_local).get_run(r.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert (ds.name, ds.digest, ds.source_type) == ("toxicity (prompt_variants)", "0123abcd", "hugging_face")
    assert json.loads(ds.source) == {"data": {"kind": "hub", "path": src.path, "split": "en"}}
    assert json.loads(ds.profile) == {"num_rows": 42}
    assert {(t.key, t.value) for t in inputs[0].tags} == {("mlflow.data.context", "extraction")}


def test_log_metrics_to_a_run_that_is_not_active(mlflow_local):
    from mlflow import MlflowClient

    spec = TrackingSpec(experiment="t")
    with tracking.run(spec, "parent") as parent:
        with tracking.run(spec, "child", parent_run_id=parent.info.run_id):
            tracking.log_metrics({"stage seconds/a": 2.5}, run_id=parent.info.run_id)
    assert MlflowClient(mlflow_local).get_run(parent.info.run_id).data.metrics == {"stage_seconds_a": 2.5}


_WORKER = """
import json, sys
from raysafe import tracking
info = json.loads(sys.argv[1])
w = tracking.attach(info)
for step in (1, 2, 3):
    w.log_metrics({"loss/total": 1.0 / step, "lr": 0.1}, step=step)
w.close()
"""


def test_a_worker_process_logs_into_the_drivers_run_without_ending_it(mlflow_local, tmp_path):
    """What a Ray Train rank-0 worker does: attach by run id from another process and cwd (a relative SQLite URI is
    made absolute), log per-step metrics, detach; the driver's run stays RUNNING until the driver ends it."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    spec = TrackingSpec(experiment="t", tracking_uri="sqlite:///mlflow.db")  # relative to the driver's cwd
    elsewhere = tmp_path / "worker_cwd"
    elsewhere.mkdir()
    with tracking.run(spec, "train") as r:
        info = tracking.attach_info(spec, r)
        assert info["uri"] == mlflow_local and info["run_id"] == r.info.run_id and info["system_metrics"] is False
        subprocess.run([sys.executable, "-c", _WORKER, json.dumps(info)], cwd=elsewhere, check=True)
        assert _status(mlflow_local, r.info.run_id) == "RUNNING"
    client = MlflowClient(mlflow_local)
    history = client.get_metric_history(r.info.run_id, "loss_total")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert _status(mlflow_local, r.info.run_id) == "FINISHED"
    assert not (elsewhere / "mlflow.db").exists()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):  # a run missing from the store fails at attach, not at the first metric
        tracking.attach({**info, "run_id": "0" * 32})


def test_system_metrics_only_when_asked(mlflow_local, monkeypatch):
    import time

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient(mlflow_local)
    with tracking.run(TrackingSpec(experiment="t"), "off") as off:
        time.sleep(0.6)
    with tracking.run(TrackingSpec(experiment="t", log_system_metrics=True), "on") as on:
        time.sleep(1.0)
        worker = tracking.attach(tracking.attach_info(TrackingSpec(log_system_metrics=True), on), node="rank0")
        time.sleep(1.0)
        worker.close()
    assert not [k for k in client.get_run(off.info.run_id).data.metrics if k.startswith("system/")]
    keys = set(client.get_run(on.info.run_id).data.metrics)
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys
    assert "system/rank0/cpu_utilization_percentage" in keys  # the worker's own series, apart from the driver's


def test_system_metrics_gaps_name_what_to_install():
    assert tracking.system_metrics_gaps(True, True, True) == []
    assert tracking.system_metrics_gaps(True, False, False) == []  # no GPU: pynvml is not needed
    assert tracking.system_metrics_gaps(True, False, True) == ["GPU metrics need pynvml (pip install nvidia-ml-py)"]
    assert "psutil" in tracking.system_metrics_gaps(False, True, False)[0]


def test_lineage_file_names_are_the_trainers():
    from raysafe.train.checkpoint import STATE_FILE
    from raysafe.train.identity import IDENTITY_FILE

    assert (tracking.IDENTITY_FILE, tracking.STATE_FILE) == (IDENTITY_FILE, STATE_FILE)


def _checkpoint(root, lr: float = 1e-5, step: int = 4):
    ckpt = root / "run" / "checkpoint_000001"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "config.json").write_text("{}")
    (ckpt / "run_identity.json").write_text(json.dumps({"optim.lr": lr, "weights: model": "abc"}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (ckpt / "train_config.yaml").write_text("model: {path: x}\n")
    return ckpt


def test_checkpoint_lineage_links_the_consumer_to_the_training_run_and_identity(mlflow_local, tmp_path):
    from mlflow import MlflowClient

    from raysafe.config import ModelSpec
    from raysafe.identity import digest

    ckpt = _checkpoint(tmp_path)
    ident = digest({"optim.lr": 1e-5, "weights: model": "abc"})
    with tracking.run(TrackingSpec(experiment="train"), "train") as producer:
        tracking.log_checkpoint(ckpt, ("trainer_state.json", "train_config.yaml", "run_identity.json", "absent"))
    client = MlflowClient(mlflow_local)
    made = client.get_run(producer.info.run_id)
    assert made.data.params["checkpoint"] == str(ckpt)
    assert made.data.tags["raysafe.checkpoint.identity"] == ident and made.data.tags["raysafe.checkpoint.step"] == "4"
    arts = {a.path for a in client.list_artifacts(producer.info.run_id)}
    assert arts == {"trainer_state.json", "train_config.yaml", "run_identity.json"}
    model = client.get_logged_model(made.data.tags["raysafe.checkpoint.model_id"])
    assert model.source_run_id == producer.info.run_id and model.params["identity"] == ident

    # a consumer in another experiment loads <checkpoint>/model: it names the run and identity its model came from
    other = _checkpoint(tmp_path / "other", lr=2e-5)  # same layout, another identity: not made by that run
    with tracking.run(TrackingSpec(experiment="evaluate"), "evaluate") as consumer:
        got = tracking.log_model_lineage("policy", str(ckpt / "model"))
        tracking.log_models_lineage([ModelSpec(path=str(other / "model"), name="stranger"), ModelSpec(path="org/m")])
    assert got == {"checkpoint": str(ckpt), "identity": ident, "step": 4, "train_run": producer.info.run_id}
    run = client.get_run(consumer.info.run_id)
    tags = run.data.tags
    assert tags["raysafe.model.policy.train_run"] == producer.info.run_id
    assert tags["raysafe.model.policy.identity"] == ident
    assert tags["raysafe.model.policy.checkpoint"] == str(ckpt)
    assert [m.model_id for m in run.inputs.model_inputs] == [model.model_id]
    assert "raysafe.model.stranger.train_run" not in tags  # its identity matches no training run in the store
    assert tags["raysafe.model.stranger.identity"] == digest({"optim.lr": 2e-5, "weights: model": "abc"})
    assert not any(k.startswith("raysafe.model.m.") for k in tags)  # a hub id has no lineage


def test_lineage_of_models_that_are_not_checkpoints(tmp_path):
    assert tracking.checkpoint_lineage("org/model") is None
    plain = tmp_path / "plain"
    plain.mkdir()
    assert tracking.checkpoint_lineage(plain) is None
    broken = _checkpoint(tmp_path / "b")
    (broken / "run_identity.json").write_text("{not json")
    assert tracking.checkpoint_lineage(broken / "model") is None  # logged as a warning, never an error


def test_log_dataset_records_stored_inputs_without_a_row_count(mlflow_local):
    from mlflow import MlflowClient

    with tracking.run(TrackingSpec(experiment="t"), "analysis") as r:
        tracking.log_dataset("safety activations of m", {"store": "/x", "weights": "w1"}, "d1g35t", None, "analysis")
    (inp,) = MlflowClient(mlflow_local).get_run(r.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "safety activations of m" and inp.dataset.digest == "d1g35t"
    assert json.loads(inp.dataset.source) == {"store": "/x", "weights": "w1"} and not inp.dataset.profile
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "analysis")]


def test_an_extraction_actor_samples_its_own_system_metrics_into_the_run(mlflow_local, monkeypatch, tiny_llama_dir):
    """The model actors run on the GPU nodes, not the driver's: each samples its node into the extraction's run."""
    import os
    import socket
    import time

    from mlflow import MlflowClient

    from raysafe.extract.stages import ExtractorStage

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    spec = TrackingSpec(experiment="t", log_system_metrics=True)
    with tracking.run(TrackingSpec(experiment="t"), "extract") as r:
        stage = ExtractorStage({"path": str(tiny_llama_dir)}, {}, [1], str(os.getcwd()), "tiny", "id", 1, None)
        assert stage.run_log.run_id is None  # system metrics off: nothing attached
        stage = ExtractorStage(
            {"path": str(tiny_llama_dir)}, {}, [1], str(os.getcwd()), "tiny", "id", 1, tracking.attach_info(spec, r)
        )
        time.sleep(1.0)
        stage.run_log.close()
    keys = set(MlflowClient(mlflow_local).get_run(r.info.run_id).data.metrics)
    assert f"system/extract-{socket.gethostname()}-{os.getpid()}/cpu_utilization_percentage" in keys


def test_a_server_without_logged_models_still_gets_the_lineage_tags(mlflow_local, tmp_path, monkeypatch, caplog):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def refuse(**kwargs):
        raise MlflowException("logged models are not supported by this server")

    monkeypatch.setattr(mlflow, "create_external_model", refuse)
    ckpt = _checkpoint(tmp_path)
    with tracking.run(TrackingSpec(experiment="train"), "train") as r:
        tracking.log_checkpoint(ckpt)
    run = MlflowClient(mlflow_local).get_run(r.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raysafe.checkpoint"] == str(ckpt)
    assert "raysafe.checkpoint.model_id" not in run.data.tags and "tags only" in caplog.text


def test_the_sweeps_heldout_rows_are_its_dataset_input(mlflow_local):
    from mlflow import MlflowClient

    from raysafe.sweep.heldout import log_heldout_input

    rows = [{"group_id": "g0", "lang": "en", "text": "a"}, {"group_id": "g0", "lang": "de", "text": "b"}]
    with tracking.run(TrackingSpec(experiment="t"), "sweep") as r:
        log_heldout_input(SourceSpec(name="safety_prompts"), rows)
    (inp,) = MlflowClient(mlflow_local).get_run(r.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "held-out prompt variants" and json.loads(inp.dataset.profile) == {"num_rows": 2}
    assert json.loads(inp.dataset.source) == {"variants": {"name": "safety_prompts"}}
