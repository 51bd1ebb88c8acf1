"""Mixture-of-experts models in megatron-core on CPU: routing as transformers routes, expert
parallelism that shards the experts and keeps the logits, and the grouped-GEMM expert layout
reading and writing the same checkpoint as the sequential one.

Logits parity with transformers and TP=2 for the MoE tiny models are in test_parallel.py
(they are among TINY_MODELS); megatron-core runs in megatron_worker.py (see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from megasft.checkpoint.convert import convert
from tests.checkpoint.tiny_models import TINY_MODELS, assert_bit_exact, read_hf_weights
from tests.megatron.settings import GROUPED_MODEL

pytestmark = pytest.mark.slow

MOE_MODELS = ["mixtral", "qwen3_moe", "qwen3_moe_dense"]


def test_the_moe_tiny_models_are_the_ones_checked_here():
    assert sorted(name for name in TINY_MODELS if "moe" in name or name == "mixtral") == MOE_MODELS


def transformers_routing(logits: torch.Tensor, topk: int, normalize: bool):
    """transformers' own router on `logits` [tokens, experts]: an identity gate makes its
    linear layer pass the logits through exactly. Returns (probs, map), [tokens, experts]."""
    experts = logits.shape[-1]
    config = Qwen3MoeConfig(
        hidden_size=experts,
        num_experts=experts,
        num_experts_per_tok=topk,
        norm_topk_prob=normalize,
    )
    router = Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        _, weights, indices = router(logits)
    probs = torch.zeros_like(logits).scatter(1, indices, weights)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
    return probs, chosen


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("topk", [2, 4])
def test_router_picks_and_weighs_experts_as_transformers_even_on_ties(worker_runs, topk, normalize):
    results = torch.load(worker_runs / "router_ties.pt")
    logits = results["logits"].view(-1, 8)  # [tokens, experts], values in {0, 1, 2, 3}
    probs, chosen = results[(topk, normalize)]
    expected_probs, expected_chosen = transformers_routing(logits, topk, normalize)
    # Ties at the k-th place are common in these logits, so the choice among them matters.
    kth, next_best = logits.sort(dim=-1, descending=True).values[:, topk - 1 : topk + 1].unbind(-1)
    assert (kth == next_best).float().mean() > 0.3
    assert torch.equal(chosen, expected_chosen)
    assert torch.equal(probs, expected_probs)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_ep2_logits_match_ep1(worker_runs, name):
    ep1 = torch.load(worker_runs / f"logits_tp1_{name}.pt")
    ep2 = torch.load(worker_runs / f"logits_ep2_{name}.pt")
    torch.testing.assert_close(ep2, ep1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_each_ep_rank_loads_its_half_of_the_experts(worker_runs, name):
    hf = read_hf_weights(worker_runs / "hf" / name)
    last_layer = 1
    held = []
    for rank in (0, 1):
        experts = torch.load(worker_runs / f"experts_ep2_{name}_rank{rank}.pt")
        numbers = sorted({int(key.split(".")[0]) for key in experts})
        assert numbers == [2 * rank, 2 * rank + 1]  # 4 experts over 2 ranks, in order
        held += numbers
        for expert in numbers:
            down = next(
                tensor
                for hf_name, tensor in hf.items()
                if f"layers.{last_layer}." in hf_name
                and f"experts.{expert}." in hf_name
                and hf_name.endswith(("down_proj.weight", "w2.weight"))
            )
            assert torch.equal(experts[f"{expert}.linear_fc2"], down)
    assert held == [0, 1, 2, 3]


def test_grouped_gemm_layout_loads_and_saves_the_same_checkpoint(worker_runs, tmp_path):
    if not (worker_runs / "resaved_grouped").is_dir():
        pytest.skip("this megatron-core has no grouped-GEMM experts without Transformer Engine")
    # The worker loaded the converted checkpoint into megatron-core's grouped-GEMM experts,
    # checked each expert's weights against the sequential experts', and saved it again with
    # megatron-core's own dist_checkpointing.save: that exports to the original weights.
    convert("megatron", "hf", worker_runs / "resaved_grouped", tmp_path / "hf")
    assert_bit_exact(
        read_hf_weights(worker_runs / "hf" / GROUPED_MODEL), read_hf_weights(tmp_path / "hf")
    )
