"""The pieces of a training checkpoint that make resuming safe and exact: the manifest of digests checked before
DeepSpeed unpickles anything, and the random-number state that a resumed worker continues from."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from raysafe.errors import OutputError
from raysafe.train.manifest import verify_manifest, write_manifest
from raysafe.train.rng import apply_rng, read_rng, save_rng


def _checkpoint(root, rank: int, files: dict[str, bytes]) -> None:
    part = root / f"rank{rank}"
    for rel, data in files.items():
        (part / rel).parent.mkdir(parents=True, exist_ok=True)
        (part / rel).write_bytes(data)
    write_manifest(part, rank)
    for p in part.rglob("*"):  # Ray Train persists the union of the ranks' directories as one checkpoint
        if p.is_file():
            target = root / "ckpt" / p.relative_to(part)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())


def test_manifest_accepts_what_was_written_and_refuses_anything_else(tmp_path):
    _checkpoint(tmp_path, 0, {"deepspeed/ds/mp_rank_00_model_states.pt": b"a" * 100, "trainer_state.json": b"{}"})
    _checkpoint(tmp_path, 1, {"deepspeed/ds/zero_pp_rank_1_optim_states.pt": b"b" * 100})
    ck = tmp_path / "ckpt"
    (ck / ".metadata.json").write_text("{}")  # Ray Train's own top-level metadata is not ours to list
    verify_manifest(ck, world_size=2)

    with pytest.raises(OutputError, match="2 rank manifest"):
        verify_manifest(ck, world_size=4)
    shard = ck / "deepspeed/ds/zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(b"b" * 99 + b"c")
    with pytest.raises(OutputError, match="SHA-256 mismatch") as e:
        verify_manifest(ck)
    assert e.value.where == str(shard) and "--restart" in e.value.fix
    shard.write_bytes(b"b" * 100)
    (ck / "deepspeed/ds/extra.pt").write_bytes(b"pickle")
    with pytest.raises(OutputError, match="does not list"):
        verify_manifest(ck)
    (ck / "deepspeed/ds/extra.pt").unlink()
    shard.unlink()
    with pytest.raises(OutputError, match="missing"):
        verify_manifest(ck)
    bare = tmp_path / "foreign"
    (bare / "deepspeed").mkdir(parents=True)
    with pytest.raises(OutputError, match="no manifest"):
        verify_manifest(bare)


def test_random_state_round_trips_torch_numpy_and_python(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.rand(5), np.random.rand(5), random.random(), np.random.randn()  # some draws, a cached gaussian
    save_rng(tmp_path / "rng.safetensors")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(2))
    saved = read_rng(tmp_path / "rng.safetensors")
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    apply_rng(saved)
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and np.array_equal(got[3], expected[3])
