"""The start-of-job kernel check: attention kernel decisions (pure), the DeepSpeed op summary, and the real report on
this CPU machine (sdpa/cpu, the DS op status), which never raises."""

from __future__ import annotations

import logging

import pytest

from raysafe.config import ModelSpec
from raysafe.kernels import OpStatus, attention_kernel, kernel_report, log_kernel_report, model_specs, ops_summary


@pytest.mark.parametrize(
    "asked, device, cap, half, fa, used, why",
    [
        ("eager", "cuda", (9, 0), True, "2.8.3", "eager", "plain"),
        ("sdpa", "cpu", None, False, None, "sdpa/cpu", "CPU kernel"),
        ("sdpa", "cuda", (9, 0), True, None, "sdpa/flash", "sm90"),
        ("sdpa", "cuda", (7, 5), True, None, "sdpa/mem_efficient-or-math", ">= 8.0"),
        ("sdpa", "cuda", (8, 0), False, None, "sdpa/mem_efficient-or-math", "bf16"),
        ("flash_attention_2", "cuda", (9, 0), True, "2.8.3", "flash_attention_2", "flash_attn 2.8.3"),
        ("flash_attention_2", "cuda", (9, 0), True, None, "unavailable", "INSTALL_FLASH_ATTN=1"),
        ("flash_attention_2", "cpu", None, False, "2.8.3", "unavailable", "CUDA GPUs only"),
        ("flash_attention_2", "cuda", (7, 0), True, "2.8.3", "unavailable", "sm70"),
        ("flash_attention_2", "cuda", (8, 6), False, "2.8.3", "unavailable", "bfloat16"),
    ],
)
def test_attention_kernel_decisions(asked, device, cap, half, fa, used, why):
    k = attention_kernel("m", asked, device, cap, half, fa)
    assert k.used == used and why in k.why


def test_ops_summary_names_the_training_ops_and_what_is_prebuilt_or_compilable():
    ops = [OpStatus("fused_adam", True, True), OpStatus("cpu_adam", False, True), OpStatus("async_io", False, False)]
    line = ops_summary("0.19.8", "cuda", ops)
    assert line.startswith("DeepSpeed 0.19.8 on cuda: fused_adam prebuilt, cpu_adam JIT-compilable;")
    assert "prebuilt ops: fused_adam;" in line and line.endswith("JIT-compilable: cpu_adam")
    none = ops_summary("0.19.8", "cpu", [OpStatus("async_io", False, False)])
    assert "fused_adam absent, cpu_adam absent" in none and "prebuilt ops: none" in none


def test_model_specs_are_found_anywhere_in_a_flow_config():
    from raysafe.evaluate.config import EvaluateConfig

    cfg = EvaluateConfig.model_validate(
        {"models": [{"path": "org/a"}, {"path": "org/b", "attn_implementation": "eager"}]}
    )
    assert [m.path for m in model_specs(cfg)][:2] == ["org/a", "org/b"]


def test_the_report_on_this_cpu_says_sdpa_cpu_and_the_deepspeed_ops_without_raising(caplog):
    from raysafe.train.config import TrainConfig

    cfg = TrainConfig.model_validate({"model": {"path": "org/m", "attn_implementation": "flash_attention_2"}})
    with caplog.at_level(logging.INFO, logger="raysafe.kernels"):
        lines = log_kernel_report("train", cfg)
    text = "\n".join(lines)
    assert "this process sees no GPU" in text
    assert "attention of m: asked flash_attention_2 -> unavailable" in text
    ds = [x for x in lines if x.startswith("DeepSpeed ")]
    assert len(ds) == 1 and " on cpu: fused_adam " in ds[0] and "cpu_adam" in ds[0]
    assert any(r.levelno == logging.WARNING and "unavailable" in r.getMessage() for r in caplog.records)
    sdpa = kernel_report("extract", ModelSpec(path="org/m"))
    assert sdpa[-1] == "attention of m: asked sdpa -> sdpa/cpu (torch SDPA's CPU kernel)"
    assert not any(x.startswith("DeepSpeed") for x in sdpa)  # only flows that train import DeepSpeed


def test_a_broken_check_only_logs(monkeypatch, caplog):
    import raysafe.kernels as kernels

    def boom(flow, cfg):
        raise RuntimeError("no device query")

    monkeypatch.setattr(kernels, "kernel_report", boom)
    with caplog.at_level(logging.WARNING, logger="raysafe.kernels"):
        assert log_kernel_report("extract", None) == []
    assert "kernel check skipped (RuntimeError: no device query)" in caplog.text
