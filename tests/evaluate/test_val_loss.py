"""Validation loss equals the trainer's loss on the same rows."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from megasft.data import open_split, read_examples
from megasft.errors import InputError
from megasft.evaluate.val_loss import split_documents, validation_loss
from megasft.train.batch import block_causal_mask, packed_position_ids
from megasft.train.loss import masked_token_loss


def _trainer_loss(model, data_dir, split="train") -> tuple[float, int]:
    """What the training stage computes: packed rows, block-diagonal mask, restarted positions,
    `masked_token_loss`, one global division."""
    rows = list(read_examples(data_dir, split))
    seq_len = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        loss_mask[index, : len(row["loss_mask"])] = torch.tensor(row["loss_mask"])
    seq_lengths = [row["seq_lengths"] for row in rows]
    blocked = block_causal_mask(seq_lengths, seq_len)  # True = masked out (megatron)
    additive = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=additive,
            position_ids=packed_position_ids(seq_lengths, seq_len),
        ).logits
    loss_sum, count = masked_token_loss(logits, input_ids, loss_mask)
    return (loss_sum / count).item(), int(count.item())


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_val_loss_equals_the_trainers_loss_on_packed_rows(
    which, base_model_dir, tuned_model_dir, prepared_dir
):
    rows = list(read_examples(prepared_dir, "train"))
    assert any(len(row["seq_lengths"]) > 1 for row in rows), "the data must hold packed rows"
    model_dir = base_model_dir if which == "base" else tuned_model_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected, count = _trainer_loss(model, prepared_dir)
    for batch_tokens in (1, 100, 10_000):  # one document per pass ... all in one pass
        result = validation_loss(model, prepared_dir, "train", batch_tokens=batch_tokens)
        assert result.target_tokens == count
        assert result.loss == pytest.approx(expected, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.documents == 4 and result.rows == len(rows)
    if which == "base":
        assert result.loss > 3  # about ln(vocab) for an untrained model
    else:
        assert result.loss < 0.1


def test_documents_are_split_back_out(prepared_dir):
    table = open_split(prepared_dir, "train")
    documents = split_documents(table)
    rows = table.to_pylist()
    assert [len(ids) for ids, _ in documents] == [n for row in rows for n in row["seq_lengths"]]
    assert [t for ids, _ in documents for t in ids] == [t for row in rows for t in row["input_ids"]]


def test_empty_split_is_a_clear_error(base_model_dir, prepared_dir):
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with pytest.raises(InputError, match="the val split of .* is empty.*--val-fraction"):
        validation_loss(model, prepared_dir, "val")


def test_not_a_prepared_dataset(base_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with pytest.raises(InputError, match="not a `megasft prepare` output"):
        validation_loss(model, tmp_path, "val")
