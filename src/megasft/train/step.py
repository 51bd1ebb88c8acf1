"""One micro-batch through the model: its inputs, `forward_step` and `loss_func`.

megatron-core's pipeline schedules call `forward_step(data_iterator, model)` once per
micro-batch and model chunk, and call the `loss_func` it returns on the last pipeline stage
with the model's output. Everything the loss means is written out here:

- The model returns logits (vocabulary-sharded across tensor-parallel ranks); the loss is
  token cross entropy on target tokens only. `prepare` writes the mask **unshifted**
  (`loss_mask[i] == 1` iff token `i` is a target); the logits at position `i` predict token
  `i + 1`, so `labels[i] = tokens[i + 1]` and `loss_weights[i] = loss_mask[i + 1]`, shifted
  inside each document (nothing is trained across a document boundary). This is
  `megasft.train.loss.masked_token_loss`, computed with megatron-core's vocab-parallel cross
  entropy on the shards instead of on gathered logits
  (gathering [b, s, vocab] on every TP rank costs vocab x s x b x 4 bytes per rank for no
  benefit); the tests check the two agree.
- `loss_func` returns the *sum* over targets and the number of targets. With
  `calculate_per_token_loss`, megatron-core adds the counts over micro-batches, sums them
  across data- and context-parallel ranks, and divides the gradients by that total: the loss
  is averaged over every target token of the global batch, and a micro-batch without targets
  contributes exactly zero.
- The embedding is padded to a multiple of 128 rows (`ModelArchitecture.padded_vocab_size`);
  those columns are not tokens and are excluded from the softmax, so the loss equals that of
  the Hugging Face model.
- Padding positions are marked (`padding_mask`) for the routers of MoE layers, which leave
  them out of the load-balancing loss (megasft.train.moe counts no expert load for them
  either); dense layers ignore the mark.

Two layouts of a micro-batch of b rows of s tokens, each row holding documents back to back:

- "bshd" (megatron-core's local layers; the CPU): tokens [b, s] with a block-diagonal causal
  mask [b, 1, s, s] and position ids restarting at every document.
- "thd" (Transformer Engine; GPUs): the b rows concatenated into one sequence [1, b * s] and
  `PackedSeqParams` whose `cu_seqlens` mark every document (and each row's padding tail), so
  the fused attention kernels isolate documents without a mask. With context parallelism,
  every document is padded to a multiple of 2 x CP and split into 2 x CP chunks, of which
  this rank keeps chunks `r` and `2 x CP - 1 - r` (the load-balanced causal split that
  Transformer Engine's context-parallel attention expects).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megasft.train.batch import packed_position_ids
from megasft.train.data import MicroBatch


@dataclass(frozen=True)
class ModelInputs:
    """A micro-batch as the model and the loss take it, on the training device."""

    tokens: torch.Tensor
    """[b, s] (bshd) or [1, t] (thd) int64 input ids."""
    position_ids: torch.Tensor
    """Same shape; restart at 0 at every document."""
    labels: torch.Tensor
    """Same shape; labels[..., i] is the token after token i in its row (any id where there
    is none)."""
    loss_weights: torch.Tensor
    """Same shape, float32; 1 where labels[..., i] is a target."""
    attention_mask: torch.Tensor | None
    """[b, 1, s, s] bool, True = masked out (bshd only)."""
    packed_seq_params: PackedSeqParams | None
    """Document boundaries for Transformer Engine (thd only)."""
    padding_mask: torch.Tensor | None = None
    """Same shape as `tokens`, bool, True at padding positions (no document's token)."""


def shifted_targets(batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, loss_weights), both [b, s], aligned with the logits: position i predicts
    token i + 1 of the same document. The last position of a document (and of a row)
    predicts nothing: a document's first token, even where the mask marks it, is not a
    target, as in evaluation, which runs each document on its own."""
    labels = torch.zeros_like(batch.tokens)
    labels[:, :-1] = batch.tokens[:, 1:]
    loss_weights = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
    loss_weights[:, :-1] = (batch.loss_mask[:, 1:] != 0).float()
    for row, lengths in enumerate(batch.seq_lengths):
        # the last token of each document: the next one starts another document (or padding)
        ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
        loss_weights[row, ends] = 0.0
    return labels, loss_weights


def bshd_inputs(batch: MicroBatch, device: torch.device) -> ModelInputs:
    """Rows as rows, documents isolated by the block-diagonal causal mask."""
    labels, loss_weights = shifted_targets(batch)
    return ModelInputs(
        tokens=batch.tokens.to(device),
        position_ids=batch.position_ids.to(device),
        labels=labels.to(device),
        loss_weights=loss_weights.to(device),
        attention_mask=batch.attention_mask.to(device),
        packed_seq_params=None,
        padding_mask=padding_positions(batch).to(device),
    )


def padding_positions(batch: MicroBatch) -> torch.Tensor:
    """[b, s] bool, True past the documents of each row (its padding tail)."""
    filled = torch.tensor([sum(lengths) for lengths in batch.seq_lengths])
    return torch.arange(batch.tokens.shape[1])[None] >= filled[:, None]


def thd_inputs(
    batch: MicroBatch,
    device: torch.device,
    *,
    context_parallel: int = 1,
    context_rank: int = 0,
    total_multiple: int = 1,
) -> ModelInputs:
    """All rows as one packed sequence with `cu_seqlens` for Transformer Engine.

    With `context_parallel` > 1 every document is padded to a multiple of 2 x CP, and this
    rank keeps its two chunks of each. `total_multiple` pads the whole sequence (as one more
    document) so that this rank's share divides evenly for sequence parallelism.
    """
    seq_len = batch.tokens.shape[1]
    labels, loss_weights = shifted_targets(batch)
    tokens = batch.tokens.reshape(-1)  # [b * s]
    labels, loss_weights = labels.reshape(-1), loss_weights.reshape(-1)
    lengths = []  # every document of every row, padding tails included, in order
    for row_lengths in batch.seq_lengths:
        tail = seq_len - sum(row_lengths)
        lengths += list(row_lengths) + ([tail] if tail else [])

    split = 2 * context_parallel if context_parallel > 1 else 1
    padded = [-(-length // split) * split for length in lengths]
    real = list(lengths)  # tokens of the micro-batch in each document
    extra = -sum(padded) % (split * total_multiple)
    if extra:  # one more document of padding only
        lengths.append(extra)
        padded.append(extra)
        real.append(0)
    # Each document at its padded offset; padding positions are never targets.
    size = sum(padded)
    placed_tokens = torch.zeros(size, dtype=tokens.dtype)
    placed_labels = torch.zeros(size, dtype=labels.dtype)
    placed_weights = torch.zeros(size, dtype=torch.float32)
    placed_padding = torch.ones(size, dtype=torch.bool)
    real_tokens = (~padding_positions(batch)).reshape(-1)
    source = target = 0
    for count, padded_length in zip(real, padded, strict=True):
        placed_padding[target : target + count] = ~real_tokens[source : source + count]
        placed_tokens[target : target + count] = tokens[source : source + count]
        placed_labels[target : target + count] = labels[source : source + count]
        placed_weights[target : target + count] = loss_weights[source : source + count]
        source += count
        target += padded_length
    position_ids = packed_position_ids([padded], size)[0]

    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_seqlens_padded = torch.tensor([0, *padded], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if context_parallel > 1:
        keep = context_parallel_indices(padded, context_parallel, context_rank)
        placed_tokens, placed_labels = placed_tokens[keep], placed_labels[keep]
        placed_weights, position_ids = placed_weights[keep], position_ids[keep]
        placed_padding = placed_padding[keep]
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens.to(device),
        cu_seqlens_kv=cu_seqlens.to(device),
        cu_seqlens_q_padded=cu_seqlens_padded.to(device) if context_parallel > 1 else None,
        cu_seqlens_kv_padded=cu_seqlens_padded.to(device) if context_parallel > 1 else None,
        max_seqlen_q=max(padded),
        max_seqlen_kv=max(padded),
    )
    return ModelInputs(
        tokens=placed_tokens[None].to(device),
        position_ids=position_ids[None].to(device),
        labels=placed_labels[None].to(device),
        loss_weights=placed_weights[None].to(device),
        attention_mask=None,
        packed_seq_params=params,
        padding_mask=placed_padding[None].to(device),
    )


def context_parallel_indices(
    padded_lengths: list[int], context_parallel: int, context_rank: int
) -> torch.Tensor:
    """Positions this CP rank keeps: chunks r and 2CP-1-r of every document (each document
    is a multiple of 2CP long), in order."""
    chunks = 2 * context_parallel
    keep = []
    start = 0
    for length in padded_lengths:
        chunk = length // chunks
        for index in (context_rank, chunks - 1 - context_rank):
            keep.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
        start += length
    return torch.cat(keep)


def without_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [..., v/tp] of this TP rank's vocabulary shard, with the columns past the real
    vocabulary (embedding padding) at -inf, so that they take no probability."""
    shard = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return logits
    padding = torch.arange(start, start + shard, device=logits.device) >= vocab_size  # [v/tp]
    return logits.masked_fill(padding, float("-inf"))


def loss_func(
    inputs: ModelInputs, vocab_size: int, logits: torch.Tensor, inject_nan: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of target-token cross entropies, number of targets, what to report).

    `logits` is [b, s, v/tp] (or [1, t, v/tp]), this TP rank's vocabulary shard.
    """
    logits = without_padded_vocab(logits, vocab_size)
    # [b, s] fp32; the same value on every TP rank (the softmax is reduced over the shards)
    token_losses = tensor_parallel.vocab_parallel_cross_entropy(logits, inputs.labels)
    # Multiply, not index: masked positions contribute exactly 0, and no target means 0.
    loss_sum = (token_losses * inputs.loss_weights).sum()
    target_count = inputs.loss_weights.sum()
    if inject_nan:  # fault injection for the tests of the NaN handling (MEGASFT_INJECT_NAN_STEPS)
        loss_sum = loss_sum * float("nan")
    reported = torch.stack([loss_sum.detach(), target_count])
    return loss_sum, target_count.to(torch.int), {"loss_sum_and_count": reported}


def forward_step(
    data_iterator: Iterator[ModelInputs],
    model: torch.nn.Module,
    *,
    vocab_size: int,
    inject_nan: bool = False,
):
    """Runs one micro-batch through this pipeline stage's model chunk.

    On the last stage the output is logits and the returned `loss_func` turns them into the
    loss; on other stages it is the hidden state that the schedule sends to the next stage.
    """
    inputs = next(data_iterator)
    padding_mask = inputs.padding_mask
    # With sequence parallelism the first stage splits the mask over the sequence along with
    # the embeddings; the other stages receive hidden states already split, and need it split.
    if (
        padding_mask is not None
        and get_model_config(model).sequence_parallel
        and not get_attr_wrapped_model(model, "pre_process")
    ):
        padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
            padding_mask.transpose(0, 1).contiguous()
        ).transpose(0, 1)
    output = model(
        inputs.tokens,
        inputs.position_ids,
        inputs.attention_mask,
        packed_seq_params=inputs.packed_seq_params,
        padding_mask=padding_mask,
    )
    return output, partial(loss_func, inputs, vocab_size, inject_nan=inject_nan)
