"""scripts/gpu_check.sh: the prepared GPU check runs its code paths on CPU with --cpu, one line of figures per part."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysafe.gpu_check import datasheet_peak, line

ROOT = Path(__file__).resolve().parents[1]
# the script runs `python`: this interpreter's environment first on PATH
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def test_figures_line_and_datasheet_peaks():
    assert (
        line("train-zero3", {"zero_stage": 3, "step_s": 0.123456}) == "GPU_CHECK train-zero3 zero_stage=3 step_s=0.1235"
    )
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4
    assert datasheet_peak("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak("Some Future GPU") is None


def test_without_a_gpu_it_says_so_and_how_to_check_the_script():
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--parts", "extract"], capture_output=True, text=True, env=env
    )
    assert out.returncode != 0
    assert "no CUDA device" in out.stderr and "--cpu" in out.stderr


@pytest.mark.slow
def test_cpu_mode_runs_extraction_zero3_training_and_generation(tmp_path, tiny_llama_dir):
    figures = tmp_path / "figures.json"
    cmd = [str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--parts", "extract,train,generate", "--stages", "3"]
    cmd += ["--model", str(tiny_llama_dir), "--per-lang", "2", "--json", str(figures)]
    # generation on hf only: vLLM's CPU attention has no kernel for the tiny model's head size (16); the vllm
    # backend's own test (tests/test_vllm_backend.py) compares it with hf on Gemma 3 270M
    cmd += ["--gen-model", str(tiny_llama_dir), "--gen-backends", "hf"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("GPU_CHECK ")]
    assert [x.split()[1] for x in lines][:4] == ["peak", "extract", "train-zero3", "generate-hf"]
    got = json.loads(figures.read_text())
    assert got["extract"]["rows"] == 20 and got["extract"]["tokens"] > 0
    assert 0 < got["extract"]["mfu_measured_peak"] and math.isfinite(got["extract"]["tok_s_e2e"])
    train = got["train-zero3"]
    assert train["steps"] == 2 and train["zero_stage"] == 3
    assert train["peak_mem_gib"] > 0 and train["tok_s"] > 0 and train["mfu_measured_peak"] > 0
    hf = got["generate"][0]
    assert hf["backend"] == "hf" and hf["prompts"] == 8 and hf["tok_s"] > 0 and hf["ratio_to_hf"] == 1.0
