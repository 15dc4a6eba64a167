"""The learning-rate multiplier against transformers' schedules (the MLC release trains with LLaMA-Factory's Trainer)."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from raysafe.errors import ConfigError
from raysafe.train.config import OptimSpec
from raysafe.train.ds_config import lr_lambda


def hf_multipliers(factory, total: int, warmup_ratio: float) -> list[float]:
    """Multipliers of a transformers scheduler, with the warm-up length of TrainingArguments (⌈ratio · total⌉)."""
    import math

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt, num_warmup_steps=math.ceil(warmup_ratio * total), num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "schedule,factory", [("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)]
)
@pytest.mark.parametrize("total,ratio", [(100, 0.1), (37, 0.1), (10, 0.25), (5, 0.0)])
def test_default_warmup_equals_transformers(schedule, factory, total, ratio):
    f = lr_lambda(schedule, total, ratio)
    ours = [f(s) for s in range(total)]
    assert ours == pytest.approx(hf_multipliers(factory, total, ratio), abs=1e-12)
    if ratio:
        assert ours[0] == 0.0  # the first optimiser step runs at lr 0, as in the release


def test_shifted_warmup_is_the_option():
    f = lr_lambda("cosine", 100, 0.1, "shifted")
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(10) == pytest.approx(1.0)
    assert OptimSpec().warmup_shape == "hf"
    with pytest.raises(ConfigError, match="warm-up shape"):
        lr_lambda("cosine", 10, 0.1, "sideways")
