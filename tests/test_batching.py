import random

import pytest

from raysafe.models.batching import (
    pad_batch,
    padding_efficiency,
    plan_batches,
    plan_token_batches,
)


def test_plan_respects_budget_and_covers_every_row():
    lengths = [5, 50, 7, 48, 12, 3, 30, 31, 2, 100]
    plan = plan_batches(lengths, max_tokens=100, max_rows=4)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 4
        assert max(lengths[i] for i in b) * len(b) <= 100 or len(b) == 1


def test_sorted_plan_pads_less_than_input_order():
    lengths = [3, 90, 4, 85, 5, 80, 6, 75] * 4
    sorted_plan = plan_batches(lengths, max_tokens=400, max_rows=4)
    input_order = [list(range(i, i + 4)) for i in range(0, len(lengths), 4)]
    assert padding_efficiency(lengths, sorted_plan) > 0.9 > padding_efficiency(lengths, input_order)


def test_pad_batch_sides():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first]] + part
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1 :]


def _cost(lengths, batches, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)


def _feasible(lengths, batches, max_tokens, max_rows):
    return all(
        len(b) <= max_rows and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= max_tokens) for b in batches
    )


@pytest.mark.parametrize("seed", range(12))
def test_token_plan_is_optimal_over_every_partition(seed):
    """Against brute force over all set partitions (not only contiguous runs of the sorted rows)."""
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    lengths = [rng.choice([rng.randint(1, 20), rng.randint(20, 90)]) for _ in range(n)]
    max_tokens, max_rows, overhead = rng.choice([60, 120, 400]), rng.randint(1, 5), rng.choice([0, 5, 40])
    plan = plan_token_batches(lengths, max_tokens, max_rows, overhead)
    assert sorted(i for b in plan for i in b) == list(range(n))
    assert _feasible(lengths, plan, max_tokens, max_rows)
    best = min(
        _cost(lengths, p, overhead)
        for p in _set_partitions(list(range(n)))
        if _feasible(lengths, p, max_tokens, max_rows)
    )
    assert _cost(lengths, plan, overhead) == best


def test_token_plan_pads_less_than_the_greedy_cut_on_mixed_scripts():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(9, 145), rng.randint(14, 256)]) for _ in range(100)]
    greedy = plan_batches(lengths, max_tokens=8192, max_rows=256)
    planned = plan_token_batches(lengths, max_tokens=8192, max_rows=256, overhead_tokens=128)
    assert padding_efficiency(lengths, greedy) < 0.7
    assert padding_efficiency(lengths, planned) > 0.85
    assert padding_efficiency(lengths, plan_token_batches(lengths, 8192, 256, overhead_tokens=0)) == 1.0
    assert plan_token_batches([], 100, 4, 10) == []
