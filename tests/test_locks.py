"""Output-directory locks, --restart's moving aside, stale temporary files, and the CLI flag that reaches the flows."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from raysafe import cli
from raysafe.atomic import atomic_write_json, remove_stale_temp_files
from raysafe.errors import OutputError
from raysafe.locks import lock_path, move_aside, output_lock


def test_a_second_holder_is_refused_with_the_first_named_and_the_lock_is_released(tmp_path):
    out = tmp_path / "run"
    with output_lock(out, "training run") as path:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"]
        with pytest.raises(OutputError) as e:
            with output_lock(out, "training run"):
                pass
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(e.value) and str(path) in e.value.fix
    assert not lock_path(out).exists()


def test_a_lock_whose_holder_died_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "old"}))
    with caplog.at_level(logging.WARNING, logger="raysafe.locks"):
        with output_lock(out, "training run") as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and f"pid {dead.pid}" in caplog.text


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    lock_path(out).write_text(json.dumps({"host": "node-7", "pid": 1, "command": "raysafe sweep s.yaml"}))
    with pytest.raises(OutputError, match="node-7") as e:
        with output_lock(out, "sweep"):
            pass
    assert "raysafe sweep s.yaml" in str(e.value) and "delete" in e.value.fix


def test_move_aside_keeps_the_old_outputs(tmp_path):
    out = tmp_path / "eval"
    atomic_write_json(out / "metrics" / "summary.json", {"a": 1})
    moved = move_aside(out)
    assert not out.exists() and moved.name.startswith("eval.replaced-")
    assert json.loads((moved / "metrics" / "summary.json").read_text()) == {"a": 1}
    assert move_aside(out) is None  # nothing to move


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    import tempfile

    atomic_write_json(tmp_path / "gen" / "_done" / "shard-00000.json", {"rows": 3})
    fd, tmp = tempfile.mkstemp(prefix=".shard-00001.parquet.", dir=tmp_path / "gen")  # as atomic_write_* names them
    os.close(fd)
    keep = tmp_path / "gen" / ".metadata.json"
    keep.write_text("{}")
    assert remove_stale_temp_files(tmp_path) == 1
    assert not os.path.exists(tmp) and keep.exists() and (tmp_path / "gen" / "_done" / "shard-00000.json").exists()


@pytest.mark.parametrize("flow", sorted(cli.RESTARTABLE))
def test_restart_flag_reaches_the_flows_that_have_resumable_outputs(flow, monkeypatch, capsys):
    seen = {}

    class Result:
        def summary(self):
            return "ok"

    def fake_run(cfg, **kw):
        seen.update(kw)
        return Result()

    monkeypatch.setattr(cli, "_config", lambda args, cls: object())
    monkeypatch.setattr(cli, "_resolve", lambda ref: fake_run if ":run_" in ref else object)
    assert cli.main([flow, "any.yaml", "--restart"]) == 0
    assert seen == {"restart": True}
    seen.clear()
    assert cli.main([flow, "any.yaml"]) == 0
    assert seen == {}


def test_flows_without_resumable_outputs_have_no_restart_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["separation", "any.yaml", "--restart"])
    assert "unrecognized arguments: --restart" in capsys.readouterr().err
