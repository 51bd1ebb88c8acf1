"""Validation loss and perplexity of a Hugging Face model on a `megasft prepare` output.

The loss is the trainer's own (`megasft.train.loss.masked_token_loss`): summed over the target
tokens of the whole split, divided once by their count. Packed rows are split back into their
documents, each run on its own, which computes what the trainer's block-diagonal mask does
(docs/evaluate.md, "Validation data"). Documents are sorted by length and batched up to a token
budget, padded on the right: causal attention never lets a real token see the padding after
it, and padded positions are never targets.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from megasft.data import open_split
from megasft.errors import InputError
from megasft.train.loss import masked_token_loss

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class ValidationLoss:
    loss: float
    """Mean cross entropy per target token (nats)."""
    perplexity: float
    """exp(loss)."""
    target_tokens: int
    documents: int
    rows: int
    """Rows of the split (a packed row holds several documents)."""


def open_val_split(data_dir: str | Path, split: str) -> pa.Table:
    """A split of a prepared dataset, as an Arrow table with rows to compute a loss on.

    Raises:
        InputError: when `data_dir` is not a prepared dataset or the split has no rows.
    """
    table = open_split(data_dir, split)
    if table.num_rows == 0:
        raise InputError(
            f"the {split} split of {data_dir} is empty; prepare the data with --val-fraction "
            "above 0, or evaluate on --val-split train"
        )
    return table


def split_documents(table) -> list[tuple[list[int], list[int]]]:
    """Splits packed rows back into their documents.

    Args:
        table: rows of a prepared split (`input_ids`, `loss_mask`, `seq_lengths`).

    Returns:
        (input_ids, loss_mask) of every document of every row, in order.

    Raises:
        InputError: when a row's `seq_lengths` do not add up to its length.
    """
    documents = []
    for row in table.to_pylist():
        start = 0
        for length in row["seq_lengths"]:
            documents.append(
                (row["input_ids"][start : start + length], row["loss_mask"][start : start + length])
            )
            start += length
        if start != len(row["input_ids"]):
            raise InputError(
                f"a row's seq_lengths {row['seq_lengths']} sum to {start}, but it holds "
                f"{len(row['input_ids'])} tokens: the prepared dataset is corrupt; prepare it again"
            )
    return documents


def validation_loss(
    model: torch.nn.Module,
    data_dir: str | Path,
    split: str = "val",
    batch_tokens: int = 4096,
    progress: bool = False,
    description: str = "val loss",
) -> ValidationLoss:
    """Mean masked token loss of `model` on a split of a prepared dataset.

    Args:
        model: a Hugging Face causal LM.
        data_dir: a `prepare` output directory.
        split: "val" or "train".
        batch_tokens: token budget of one forward pass (documents x longest length).
        progress: show a progress bar on stderr, labelled `description`.

    Returns:
        The loss, its perplexity and what they were computed on.

    Raises:
        InputError: for an empty split or one without target tokens.
    """
    table = open_val_split(data_dir, split)
    documents = split_documents(table)
    documents.sort(key=lambda document: len(document[0]), reverse=True)
    device = next(model.parameters()).device
    loss_sum, target_count = 0.0, 0
    bar = tqdm(
        total=len(documents),
        unit=" docs",
        desc=description,
        file=sys.stderr,
        disable=not progress,
    )
    start = 0
    while start < len(documents):
        width = len(documents[start][0])  # longest first
        count = max(1, batch_tokens // max(width, 1))
        batch = documents[start : start + count]
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        loss_mask = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            loss_mask[row, : len(mask)] = torch.tensor(mask)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits  # [b, s, v]
            batch_sum, batch_count = masked_token_loss(
                logits, input_ids.to(device), loss_mask.to(device)
            )
        # Accumulated in float64 on the host: the split can hold millions of target tokens.
        loss_sum += float(batch_sum.double())
        target_count += int(batch_count.item())
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    if target_count == 0:
        raise InputError(
            f"the {split} split of {data_dir} has no target tokens (every loss_mask is 0), so "
            "there is no loss to compute"
        )
    loss = loss_sum / target_count
    return ValidationLoss(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        target_tokens=target_count,
        documents=len(documents),
        rows=table.num_rows,
    )
