"""Training a mixture-of-experts model end to end on CPU: expert parallelism, tensor
parallelism and either token dispatcher train the single-rank curve, with the load-balancing
loss on and off, and the run reports its routing.

Two launches do the work (train_worker.py, modes moe_single and moe_parallel, fixtures in
conftest.py) on the workspace's tiny random Qwen3-MoE (2 layers, 8 experts, top 2).
"""

from __future__ import annotations

import json

import pytest

from tests.train.launching import result_of
from tests.train.reference import first_global_batch, reference_loss

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


def test_first_step_loss_equals_the_transformers_models(workspace, moe_single):
    # The load-balancing loss is not part of the reported loss, so on or off, the first step
    # reports the language-model loss of transformers' Qwen3-MoE on the same targets.
    rows = first_global_batch(workspace.packed, global_batch_size=8)
    expected = reference_loss(workspace.hf_moe_model, workspace.packed, "train", rows)
    for name in ("moe_reference", "moe_reference_no_aux"):
        assert abs(result_of(moe_single, name)["losses"][0] - expected) < TOLERANCE


def assert_same_curve(result: dict, reference: dict) -> None:
    assert len(result["losses"]) == len(reference["losses"]) == 5
    for actual, expected in zip(result["losses"], reference["losses"], strict=True):
        assert abs(actual - expected) < TOLERANCE
    for actual, expected in zip(result["grad_norms"], reference["grad_norms"], strict=True):
        assert abs(actual - expected) < TOLERANCE * expected
    # The same tokens went to the same experts at every step.
    tokens = [record["moe_expert_tokens"] for record in result["routing"]]
    assert tokens == [record["moe_expert_tokens"] for record in reference["routing"]]


@pytest.mark.parametrize(
    ("layout", "reference"),
    [
        ("moe_ep2", "moe_reference"),
        ("moe_ep2_no_aux", "moe_reference_no_aux"),
        ("moe_tp2", "moe_reference"),
        ("moe_tp2_no_aux", "moe_reference_no_aux"),
        ("moe_ep2_allgather", "moe_reference"),
        ("moe_tp2_etp1_ep2", "moe_reference"),
    ],
)
def test_expert_and_tensor_parallel_reproduce_the_single_rank_curve(
    moe_single, moe_parallel, layout, reference
):
    assert_same_curve(result_of(moe_parallel, layout), result_of(moe_single, reference))


def test_resume_at_another_expert_tensor_size_continues_the_run(moe_parallel):
    """Without the distributed optimizer, megatron-core reshards the experts and their Adam
    state to ETP=2 (with TP=2), and the run continues its curve (megasft.train.resume)."""
    result = result_of(moe_parallel, "moe_resume_with_another_layout")
    assert len(result["resumed"]) == len(result["first"]) == 4
    for resumed, first in zip(result["resumed"], result["first"], strict=True):
        assert abs(resumed - first) < TOLERANCE


def test_resume_that_would_give_the_experts_their_own_optimizer_is_refused(moe_parallel):
    refused = result_of(moe_parallel, "moe_resume_with_another_layout")["at_ep2"]
    assert refused is not None
    assert "--ep / --etp: the checkpoint was saved at EP=1, ETP=2, TP=2" in refused
    assert "start a new --save directory with --load" in refused


def test_the_load_balancing_loss_moves_the_gradients(moe_single):
    on, off = result_of(moe_single, "moe_reference"), result_of(moe_single, "moe_reference_no_aux")
    assert on["losses"][0] == off["losses"][0]  # the same model and batch: the LM loss
    # at coefficient 0.1, about 1%: a thousand times what the layouts above may differ by
    assert abs(on["grad_norms"][0] - off["grad_norms"][0]) > 100 * TOLERANCE * off["grad_norms"][0]
    assert on["losses"][-1] != off["losses"][-1]


def test_each_step_reports_the_routing(moe_single):
    on, off = result_of(moe_single, "moe_reference"), result_of(moe_single, "moe_reference_no_aux")
    for record, real_tokens in zip(on["routing"], on["tokens"], strict=True):
        # every token of the global batch went to its top 2 experts in each of the 2 layers;
        # padding positions are routed too, but not counted
        tokens = record["moe_expert_tokens"]
        assert [sum(layer) for layer in tokens] == [2 * real_tokens] * 2
        assert all(len(layer) == 8 for layer in tokens)
        assert record["moe_load_imbalance"] == [
            pytest.approx(max(layer) / (sum(layer) / 8), abs=1e-4) for layer in tokens
        ]
        # megatron-core's load-balancing loss is 1 for a uniform routing
        assert 0.9 < record["moe_aux_loss"] < 2
        assert record["moe_aux_loss"] == pytest.approx(
            sum(record["moe_aux_loss_per_layer"]) / 2, abs=1e-5
        )
    assert all("moe_aux_loss" not in record for record in off["routing"])
    # the coefficient from config.json (0.001) also turns the loss on
    default = result_of(moe_single, "moe_default_coefficient")
    assert "moe_aux_loss" in default["routing"][0]


def test_lora_on_the_attention_projections_of_an_moe_model(workspace, moe_single, tmp_path):
    """LoRA trains an MoE model's attention adapters (experts and routers frozen), and the
    adapters export as a Hugging Face PEFT adapter and a merged model that agree."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from megasft.checkpoint.convert import convert

    result = result_of(moe_single, "moe_lora")
    assert result["losses"][-1] < result["losses"][0]
    base = workspace.hf_moe_model
    checkpoint = workspace.root / "moe_single" / "moe_lora" / "iter_0000005"
    convert("megatron", "hf", checkpoint, tmp_path / "merged", base=base)
    convert("megatron", "hf", checkpoint, tmp_path / "adapter", base=base, adapter_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]

    def load(path):
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    tokens = torch.arange(3, 43)[None]
    with torch.no_grad():
        merged = load(tmp_path / "merged")(tokens).logits
        adapted = peft.PeftModel.from_pretrained(load(base), tmp_path / "adapter")(tokens).logits
        original = load(base)(tokens).logits
    assert (merged - original).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-4)
