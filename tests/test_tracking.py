"""The MLflow wrapper on a real SQLite store: how runs end."""

from __future__ import annotations

import pytest

from raysafe import tracking
from raysafe.config import TrackingSpec


def _status(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.status


@pytest.mark.parametrize("exc, status", [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED"),
                                         (SystemExit, "KILLED")])
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
