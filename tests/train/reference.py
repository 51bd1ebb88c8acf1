"""The loss the training tests expect, computed by transformers alone (no megasft code)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from megasft.data.store import open_split
from megasft.train.data import StepSampler


def reference_loss(model_dir: Path, dataset: Path, split: str, rows=None) -> float:
    """Cross entropy over the target tokens of these rows (all for None) by the Hugging Face
    model, each packed document run on its own (no packing tricks), summed and divided once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    table = open_split(dataset, split)
    table = (table.take(list(rows)) if rows is not None else table).to_pylist()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for row in table:
            start = 0
            for length in row["seq_lengths"]:
                ids = torch.tensor(row["input_ids"][start : start + length])
                mask = torch.tensor(row["loss_mask"][start : start + length])
                start += length
                assert mask[0] == 0  # a document's first token is never a target
                logits = model(ids[None]).logits[0]  # [n, vocab]
                losses = F.cross_entropy(logits[:-1], ids[1:], reduction="none")  # [n - 1]
                loss_sum += losses[mask[1:] == 1].sum().item()
                count += int(mask[1:].sum())
    return loss_sum / count


def first_global_batch(dataset: Path, global_batch_size: int) -> tuple[int, ...]:
    """The train rows of step 1, as the trainer samples them with the tests' seed (1234). The
    global batch does not depend on how it is split into micro-batches or data-parallel ranks."""
    sampler = StepSampler(
        rows=open_split(dataset).num_rows,
        global_batch_size=global_batch_size,
        micro_batch_size=1,
        data_parallel_size=1,
        data_parallel_rank=0,
        seed=1234,
    )
    return tuple(int(row) for row in sampler.global_batch(0))
