"""The MLflow wrapper on a real SQLite store: how runs end."""

from __future__ import annotations

import pytest

from raysafe import tracking
from raysafe.config import TrackingSpec


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
        "import sys\nfrom raysafe import tracking\nfrom raysafe.config import TrackingSpec\n"
        "with tracking.run(TrackingSpec(enabled=False), 'off') as r:\n"
        "    assert r is None\n"
        "    tracking.log_params({'a': 1}); tracking.log_metrics({'x': 1.0}); tracking.set_tags({'t': 'v'})\n"
        f"    tracking.log_artifact({str(f)!r})\n"
        "print('mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
