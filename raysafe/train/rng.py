"""Random-number state of a training worker (torch CPU and CUDA, numpy, Python), saved with every checkpoint and
restored on resume, so a killed and resumed run draws the same dropout masks as an uninterrupted one.

Stored as safetensors (no pickles): the generators' state words as tensors, the few scalars as metadata.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

RNG_DIR = "rng"


def rng_file(root: Path, rank: int) -> Path:
    return root / RNG_DIR / f"rank-{rank:05d}.safetensors"


def save_rng(path: Path) -> None:
    """Write this process's generator states to ``path``."""
    from safetensors.torch import save_file

    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py_words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {
        "python": json.dumps([py_version, py_gauss]),
        "numpy": json.dumps([np_kind, int(np_pos), int(np_has_gauss), float(np_cached)]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The saved states (tensors, metadata), read into memory: applied later by :func:`apply_rng`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def apply_rng(saved: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    """Restore the generator states read by :func:`read_rng`."""
    t, meta = saved
    torch.set_rng_state(t["torch"])
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(x) for x in t["python"].tolist()), py_gauss))
    np_kind, np_pos, np_has_gauss, np_cached = json.loads(meta["numpy"])
    np.random.set_state((np_kind, t["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))
    cuda = [t[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in t))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
