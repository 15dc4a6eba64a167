from raysafe.extract.batching import pad_batch, padding_efficiency, plan_batches


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
