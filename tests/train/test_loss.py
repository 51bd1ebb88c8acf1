"""The shared SFT loss and the packed-row helpers the trainer and the evaluation stage use."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megasft.train.batch import block_causal_mask, packed_position_ids
from megasft.train.loss import masked_token_loss


def test_cross_entropy_by_hand():
    # vocab 3; logits at position i predict token i + 1
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [5.0, 5.0, 5.0]]])  # [1, 3, 3]
    input_ids = torch.tensor([[1, 0, 2]])
    loss_mask = torch.tensor([[1, 1, 1]])  # position 0 can never be a target: ignored
    loss_sum, count = masked_token_loss(logits, input_ids, loss_mask)
    # token 1 (id 0) from logits[0]; token 2 (id 2) from logits[1]
    expected = -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(
        math.exp(3) / (1 + math.exp(1) + math.exp(3))
    )
    assert count.item() == 2
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)

    only_last = masked_token_loss(logits, input_ids, torch.tensor([[0, 0, 1]]))
    assert only_last[1].item() == 1
    assert only_last[0].item() == pytest.approx(
        -math.log(math.exp(3) / (1 + math.exp(1) + math.exp(3))), rel=1e-6
    )


def test_no_targets_gives_zero_sum_and_zero_count_not_nan():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss_sum, count = masked_token_loss(
        logits, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)
    )
    assert loss_sum.item() == 0.0 and count.item() == 0.0
    loss_sum.backward()
    assert torch.isfinite(logits.grad).all()


def test_fp32_whatever_the_logits_dtype():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 4
    input_ids = torch.randint(0, 11, (2, 5))
    loss_mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], dtype=torch.int8)
    loss_sum, count = masked_token_loss(logits.bfloat16(), input_ids, loss_mask)
    reference, _ = masked_token_loss(logits.bfloat16().float(), input_ids, loss_mask)
    assert loss_sum.dtype == torch.float32 and count.dtype == torch.float32
    assert loss_sum.item() == reference.item()
    assert count.item() == 6


def test_sums_add_up_across_micro_batches():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 9)
    input_ids = torch.randint(0, 9, (4, 6))
    loss_mask = torch.randint(0, 2, (4, 6))
    whole = masked_token_loss(logits, input_ids, loss_mask)
    halves = [
        masked_token_loss(logits[i : i + 2], input_ids[i : i + 2], loss_mask[i : i + 2])
        for i in (0, 2)
    ]
    assert sum(h[0] for h in halves).item() == pytest.approx(whole[0].item(), rel=1e-6)
    assert sum(h[1] for h in halves).item() == whole[1].item()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes do not line up"):
        masked_token_loss(
            torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4)
        )


def test_packed_position_ids_restart_per_document_and_for_padding():
    position_ids = packed_position_ids([[3, 2], [5], [2, 1, 1]], seq_len=6)
    assert position_ids.tolist() == [
        [0, 1, 2, 0, 1, 0],
        [0, 1, 2, 3, 4, 0],
        [0, 1, 0, 0, 0, 1],
    ]


def test_block_causal_mask_true_means_masked_out():
    mask = block_causal_mask([[2, 2]], seq_len=5)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    attend = (~mask[0, 0]).int().tolist()
    assert attend == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding: itself only, never an empty row
    ]


def test_helpers_refuse_lengths_that_do_not_fit():
    with pytest.raises(ValueError, match="more than seq_len"):
        packed_position_ids([[4, 3]], seq_len=6)
    with pytest.raises(ValueError, match="below 1"):
        block_causal_mask([[0, 3]], seq_len=6)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_packed_row_gives_the_loss_of_its_documents_unpacked():
    """The trainer's packed computation (block mask + restarted positions) equals the loss of
    each document on its own, which is how `megasft evaluate` computes validation loss."""
    model = _tiny_llama()
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 7, 4]
    seq_len = 18  # two tokens of padding
    documents = [torch.randint(0, 97, (n,), generator=generator) for n in lengths]
    masks = [torch.randint(0, 2, (n,), generator=generator) for n in lengths]
    for mask in masks:
        mask[0] = 0  # prepare never marks a document's first token: nothing predicts it
    input_ids = torch.cat([*documents, torch.zeros(2, dtype=torch.long)])[None]  # [1, 18]
    loss_mask = torch.cat([*masks, torch.zeros(2, dtype=torch.long)])[None]

    # Hugging Face takes a 4D float mask as additive scores: 0 attends, -inf-like masks out.
    blocked = block_causal_mask([lengths], seq_len)
    additive = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=additive,
            position_ids=packed_position_ids([lengths], seq_len),
        ).logits
        packed_sum, packed_count = masked_token_loss(logits, input_ids, loss_mask)

        unpacked_sum, unpacked_count = torch.tensor(0.0), torch.tensor(0.0)
        for ids, mask in zip(documents, masks, strict=True):
            doc_sum, doc_count = masked_token_loss(
                model(input_ids=ids[None]).logits, ids[None], mask[None]
            )
            unpacked_sum += doc_sum
            unpacked_count += doc_count

    assert packed_count.item() == unpacked_count.item() == sum(int(m[1:].sum()) for m in masks)
    assert packed_sum.item() == pytest.approx(unpacked_sum.item(), rel=1e-5)

    # And the block mask matters: plain causal attention over the packed row gives another loss.
    with torch.no_grad():
        leaky = masked_token_loss(model(input_ids=input_ids).logits, input_ids, loss_mask)[0]
    assert leaky.item() != pytest.approx(unpacked_sum.item(), rel=1e-3)
