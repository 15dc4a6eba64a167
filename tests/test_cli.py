"""The command line: what a user sees on --help, on a config error and on Ctrl-C."""

from __future__ import annotations

import pytest

from raysafe import cli


def test_help_lists_every_flow(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flow in [*cli.FLOWS, "bench"]:
        assert flow in out


def test_ctrl_c_says_what_is_kept_and_how_to_continue(monkeypatch, capsys, tmp_path):
    def interrupted(flow, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_flow", interrupted)
    assert cli.main(["study", str(tmp_path / "any.yaml")]) == 130
    err = capsys.readouterr().err
    assert "raysafe study: interrupted" in err and "run the same command again" in err
    assert "Traceback" not in err


def test_config_error_exits_2_with_field_and_fix(tmp_path, capsys):
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(
        "models: [{name: m, path: gemma3-270m}]\ndata: {kind: fixture, name: safety_prompts}\n"
        "extract: {store_dtype: int8}\n"
    )
    assert cli.main(["extract", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "extract.store_dtype" in err and "int8" in err


def test_prepare_prints_where_each_model_is_and_refuses_a_missing_path(tiny_llama_dir, tmp_path, capsys):
    assert cli.main(["prepare", str(tiny_llama_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"{tiny_llama_dir}: {tiny_llama_dir}"
    assert cli.main(["prepare", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err
