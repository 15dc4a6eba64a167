"""sequence_logprobs / token_logprobs against the naive float32 log_softmax + gather, values, gradients and memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raysafe.train.logprobs import (
    default_chunk_positions,
    mean_logprobs,
    sequence_logprobs,
    token_logprobs,
)


def naive_sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def _inputs(n=3, t=9, v=41, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # right padding
    labels[2, :] = -100  # nothing scored
    labels[2, 5] = 7
    return logits, labels


@pytest.mark.parametrize("chunk", [None, 1, 3, 100])
def test_matches_naive_values_and_gradients(chunk):
    logits, labels = _inputs()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    s, n = sequence_logprobs(a, labels, chunk_positions=chunk)
    s_ref, n_ref = naive_sequence_logprobs(b, labels)
    assert torch.equal(n, n_ref)
    assert n.tolist() == [5, 5, 1]
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
    w = torch.tensor([0.3, -1.2, 2.0])
    (s * w).sum().backward()
    (s_ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_ignore_index_other_than_default_and_mean():
    logits, labels = _inputs()
    labels = labels.masked_fill(labels == -100, -1)
    s, n = sequence_logprobs(logits, labels, ignore_index=-1)
    s_ref, _ = naive_sequence_logprobs(logits, labels, ignore_index=-1)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_logprobs(s, n), s / n, atol=1e-6, rtol=0)
    assert mean_logprobs(torch.zeros(1), torch.zeros(1, dtype=torch.long)).item() == 0.0


def test_bfloat16_logits_are_scored_in_float32():
    logits, labels = _inputs(dtype=torch.bfloat16)
    s, _ = sequence_logprobs(logits, labels, chunk_positions=2)
    s_ref, _ = naive_sequence_logprobs(logits.float(), labels)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
    x = logits.clone().requires_grad_(True)
    sequence_logprobs(x, labels)[0].sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_token_logprobs_two_dimensional_and_shape_errors():
    logits = torch.randn(6, 11)
    targets = torch.randint(0, 11, (6,))
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(token_logprobs(logits, targets, 4), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        token_logprobs(logits, targets[:5])
    with pytest.raises(ValueError):
        sequence_logprobs(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_default_chunk_is_bounded_by_budget():
    assert default_chunk_positions(262144) * 262144 <= 1 << 24
    assert default_chunk_positions(10**9) == 1


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, torch
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # fixed mmap threshold: freed tensors go back to the OS
    from raysafe.train.logprobs import sequence_logprobs
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    def peak_kib(fn):
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS:")
        fn()
        return status("VmHWM:") - base
    torch.manual_seed(0)
    logits = torch.randn(2, 257, 32768, dtype=torch.bfloat16)
    labels = torch.randint(0, 32768, (2, 257))
    naive = lambda: torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, labels[:, 1:, None]).sum()
    lean = lambda: sequence_logprobs(logits, labels, chunk_positions=16)[0].sum()
    lean(); naive()
    print(min(peak_kib(naive) for _ in range(2)), min(peak_kib(lean) for _ in range(2)))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_lower_than_naive():
    """Peak RSS growth (VmHWM after resetting it) of the chunked path is a small fraction of the naive one."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip(f"cannot reset peak RSS here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    naive_kib, lean_kib = map(int, proc.stdout.split())
    # naive: two float32 copies of 2·256·32768 logits = 128 MiB; lean: one 16-position chunk (2 MiB)
    assert naive_kib > 100 * 1024
    assert lean_kib < naive_kib / 8
