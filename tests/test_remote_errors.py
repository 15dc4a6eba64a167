"""Errors raised inside Ray workers reach the user as raysafe errors: the one unwrap helper, on Ray's real wrappers."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from raysafe.errors import ConfigError, DataError, RaysafeError, remote_errors, unwrap_remote_error


def _as_ray_task_error(err: Exception) -> Exception:
    try:
        raise err
    except Exception as e:
        return RayTaskError(
            "ExtractorStage.__call__", "Traceback (most recent call last):\n  ...", e
        ).as_instanceof_cause()


def test_ray_task_error_unwraps_to_the_raysafe_class():
    wrapped = _as_ray_task_error(
        DataError("text too long", where="row_id 3, lang 'sw'", fix="raise extract.max_length")
    )
    assert type(wrapped).__module__.startswith("ray")  # Ray's dual class, printed with the remote traceback
    err = unwrap_remote_error(wrapped)
    assert type(err) is DataError
    assert (err.what, err.where, err.fix) == ("text too long", "row_id 3, lang 'sw'", "raise extract.max_length")
    assert "Traceback" not in str(err)


def test_nested_wrappers_train_worker_group_and_controller():
    inner = _as_ray_task_error(ConfigError("bad layer", where="mlc.layer"))
    try:
        raise RuntimeError("Ray Data stage failed") from inner
    except RuntimeError as e:
        chained = e
    group = WorkerGroupError("worker 1 failed", {1: chained, 0: RuntimeError("NCCL gone")})
    err = unwrap_remote_error(ControllerError(group))
    assert type(err) is ConfigError and err.where == "mlc.layer"


def test_no_raysafe_error_inside_gives_none_and_context_manager_lets_it_through():
    assert unwrap_remote_error(_as_ray_task_error(ValueError("plain"))) is None
    with pytest.raises(ValueError):
        with remote_errors():
            raise ValueError("plain")


def test_context_manager_reraises_ours_without_ray_text():
    with pytest.raises(DataError) as info:
        with remote_errors():
            raise _as_ray_task_error(DataError("empty text", where="row 2"))
    assert type(info.value) is DataError and info.value.__suppress_context__
    assert str(info.value) == "empty text\n  where: row 2"


def test_driver_side_error_passes_unchanged():
    original = DataError("x", where="y")
    with pytest.raises(RaysafeError) as info:
        with remote_errors():
            raise original
    assert info.value is original
