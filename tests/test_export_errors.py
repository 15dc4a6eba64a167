"""`raysafe export` and model paths on checkpoints without an export: refused with what, where and what to do."""

from __future__ import annotations

import pytest

from raysafe.cli import main
from raysafe.config import ModelSpec
from raysafe.errors import ModelError
from raysafe.models.loading import resolve


def test_export_of_a_directory_that_is_no_checkpoint_exits_2_and_says_what_to_give(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a raysafe training checkpoint" in err and str(tmp_path) in err and "checkpoint_*" in err


@pytest.mark.parametrize("given", ["checkpoint", "checkpoint/model"])
def test_a_checkpoint_without_model_given_as_a_model_path_names_raysafe_export(tmp_path, given):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(ModelError) as e:
        resolve(ModelSpec(path=str(tmp_path / given)))
    assert f"raysafe export {ckpt} --merge" in e.value.fix and "training checkpoint" in e.value.what
