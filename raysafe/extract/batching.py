"""Length-aware batching under a token budget.

Rows are sorted by length (longest first) and packed greedily so that rows x longest-row <= ``max_tokens``; mixed
scripts tokenise to very different lengths, and batching neighbours in length keeps padding small.
"""

from __future__ import annotations

import torch


def plan_batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Index lists into ``lengths``; every batch has padded size (rows x max length) <= max_tokens (a single
    row longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and (new_max * (len(cur) + 1) > max_tokens or len(cur) >= max_rows):
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def pad_batch(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token lists padded to the longest, on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if side == "left":
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        else:
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
    return ids, mask


def padding_efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    """Real tokens / padded tokens over a batch plan (1.0 = no padding)."""
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real / max(padded, 1)
