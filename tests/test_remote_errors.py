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
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    group = WorkerGroupError(
        "worker 1 failed", {1: UserExceptionWithTraceback(chained, "Traceback ..."), 0: RuntimeError("NCCL gone")}
    )
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


@pytest.mark.slow
def test_real_ray_data_actor_error_reaches_the_user_as_itself(ray_local):
    import ray

    class FailingStage:  # defined here so that Ray pickles it by value; rejects row 1 as a stage rejects bad input
        def __call__(self, batch):
            if 1 in list(batch["id"]):
                raise DataError("row 1 is bad", where="row_id 1", fix="drop it")
            return batch

    def dataset():  # Ray Data takes the DataContext of the driver when the dataset is created
        return ray.data.range(3, override_num_blocks=3).map_batches(
            FailingStage, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5
        )

    from ray.data import DataContext

    from raysafe.runtime import quiet_ray_data

    DataContext.get_current().raise_original_map_exception = False  # Ray Data's default
    with pytest.raises(Exception) as raw:
        with remote_errors():
            dataset().take_all()
    assert type(raw.value) is not DataError  # UserCodeException(...) from ours: the link is lost on the way back
    quiet_ray_data()  # what every raysafe flow calls before its Ray Data pipeline
    with pytest.raises(DataError) as info:
        with remote_errors():
            dataset().take_all()
    assert type(info.value) is DataError and str(info.value) == "row 1 is bad\n  where: row_id 1\n  fix:   drop it"


@pytest.mark.slow
def test_real_ray_task_error_reaches_the_user_as_itself(ray_local):
    import ray

    @ray.remote(num_cpus=0.5, max_retries=0)
    def fail():
        raise ConfigError("bad layer", where="mlc.layer", fix="use 0..4")

    with pytest.raises(ConfigError) as info:
        with remote_errors():
            ray.get(fail.remote())
    assert type(info.value) is ConfigError and info.value.fix == "use 0..4"


def test_failed_sweep_trial_error_column_is_the_raysafe_error_on_one_line():
    from raysafe.sweep.flow import _error_text

    err = _as_ray_task_error(
        DataError("pair 'g7' has no prompt variant in ['sw']", where="group_id 'g7'", fix="add it")
    )
    assert _error_text(err) == "pair 'g7' has no prompt variant in ['sw'] | where: group_id 'g7' | fix: add it"
    assert _error_text(RuntimeError("line one\nCUDA out of memory")) == "CUDA out of memory"
