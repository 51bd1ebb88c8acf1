"""Position ids and attention masks for packed rows.

A packed row holds several documents back to back (`seq_lengths` from `megasft prepare`,
summing to the row's length); the row may be padded at the end to the batch's `seq_len`. Each
document must see only itself: its position ids restart at 0 and its tokens attend causally
to earlier tokens of the same document only. Computed this way, a packed row gives the same
logits, and so the same loss, as its documents run one by one.

The padding at the end of a row is treated as one more document: it attends causally to
itself, so that no query row of the mask is empty (an all-masked softmax row is NaN), and its
tokens are never targets, so what it computes does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _documents(seq_lengths: Sequence[Sequence[int]], seq_len: int) -> list[list[int]]:
    """Each row's document lengths with the padding tail, if any, as a last document."""
    rows = []
    for index, lengths in enumerate(seq_lengths):
        lengths = [int(length) for length in lengths]
        if any(length <= 0 for length in lengths):
            raise ValueError(f"row {index}: seq_lengths {lengths} has a length below 1")
        total = sum(lengths)
        if total > seq_len:
            raise ValueError(
                f"row {index}: seq_lengths {lengths} sum to {total}, more than seq_len {seq_len}"
            )
        rows.append(lengths + [seq_len - total] if total < seq_len else lengths)
    return rows


def packed_position_ids(seq_lengths: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """[b, seq_len] int64 position ids that restart at 0 at the start of every document.

    `seq_lengths[r]` lists the document lengths of row `r` in order (one entry for an unpacked
    row); positions past their sum (padding) count on from 0 as one more document.
    """
    rows = _documents(seq_lengths, seq_len)
    position_ids = torch.empty(len(rows), seq_len, dtype=torch.long)
    for row, lengths in enumerate(rows):
        position_ids[row] = torch.cat([torch.arange(length) for length in lengths])
    return position_ids


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """[b, 1, seq_len, seq_len] bool attention mask; **True means masked out**.

    That is megatron-core's convention (`attention_mask_func` does
    `scores.masked_fill_(mask, -10000.0)`, and its GPT dataset builds `mask < 0.5`), the
    opposite of PyTorch's SDPA and of Hugging Face's boolean masks, where True means attend.
    Query `i` may attend to key `j` iff `j <= i` and both are in the same document.
    """
    rows = _documents(seq_lengths, seq_len)
    # document[r, i]: index of the document token i of row r belongs to  # [b, s]
    document = torch.stack(
        [
            torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            for lengths in rows
        ]
    )
    same_document = document[:, :, None] == document[:, None, :]  # [b, s, s]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()  # [s, s]
    return ~(same_document & causal).unsqueeze(1)
