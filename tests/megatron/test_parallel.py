"""The converted checkpoints in megatron-core on CPU: the same logits as transformers, the same
logits at TP=2 as at TP=1, and the same training step at PP=2 and DP=2 as at PP=DP=1.

megatron-core runs in megatron_worker.py (see conftest.py); these tests compare its outputs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megasft.checkpoint.convert import convert
from tests.checkpoint.tiny_models import TINY_MODELS, assert_bit_exact, read_hf_weights
from tests.megatron.settings import CLIP_GRAD, RESAVED_MODEL

pytestmark = pytest.mark.slow

FAMILIES = sorted(TINY_MODELS)


def hf_logits(work, name) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(work / "hf" / name, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.load(work / "tokens.pt")).logits


def step(work, run: str) -> dict:
    return torch.load(work / f"step_{run}.pt")


def merged(*results: dict, field: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for result in results:
        tensors.update(result[field])
    return tensors


def assert_tensors_close(actual: dict, expected: dict, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("name", FAMILIES)
def test_megatron_logits_match_transformers(worker_runs, name):
    megatron = torch.load(worker_runs / f"logits_tp1_{name}.pt")
    reference = hf_logits(worker_runs, name)
    assert megatron.shape == reference.shape
    assert (megatron - reference).abs().max().item() <= 1e-4


def test_megatron_core_own_loader_reads_the_checkpoint(worker_runs):
    raw = torch.load(worker_runs / "logits_raw_load_llama.pt")
    assert torch.equal(raw, torch.load(worker_runs / "logits_tp1_llama.pt"))


def test_mistral_window_is_shorter_than_the_test_sequence(worker_runs):
    # Otherwise the Mistral parity above would not exercise the sliding window.
    model = AutoModelForCausalLM.from_pretrained(
        worker_runs / "hf" / "mistral", attn_implementation="eager"
    )
    tokens = torch.load(worker_runs / "tokens.pt")
    assert model.config.sliding_window < tokens.shape[1]
    model.config.sliding_window = None
    with torch.no_grad():
        without_window = model(tokens).logits
    assert (without_window - hf_logits(worker_runs, "mistral")).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_tp2_logits_match_tp1(worker_runs, name):
    tp1 = torch.load(worker_runs / f"logits_tp1_{name}.pt")
    tp2 = torch.load(worker_runs / f"logits_tp2_{name}.pt")
    torch.testing.assert_close(tp2, tp1, rtol=0, atol=1e-5)


def test_checkpoint_saved_by_megatron_at_tp2_exports_bit_exact(worker_runs, tmp_path):
    # What a trainer writes: megatron-core's own dist_checkpointing.save from a TP=2 model.
    convert("megatron", "hf", worker_runs / "resaved_tp2", tmp_path / "hf")
    assert_bit_exact(
        read_hf_weights(worker_runs / "hf" / RESAVED_MODEL), read_hf_weights(tmp_path / "hf")
    )


def test_pp2_forward_backward_matches_pp1(worker_runs):
    reference = step(worker_runs, "reference")
    first, last = step(worker_runs, "pp2_rank0"), step(worker_runs, "pp2_rank1")
    assert first["losses"] == []  # only the last stage computes the loss
    assert last["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    # Each stage holds its own layers; the last one also holds the tied output layer, whose
    # gradient finalize_model_grads sums with the embedding's over the embedding group.
    gradients = merged(first, last, field="gradients")
    tied_output = gradients.pop("output_layer.weight")
    assert_tensors_close(gradients, reference["gradients"], atol=1e-6)
    torch.testing.assert_close(
        tied_output, reference["gradients"]["embedding.word_embeddings.weight"], rtol=0, atol=1e-6
    )
    assert (
        first["grad_norm"] == last["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-6)
    )
    parameters = merged(first, last, field="parameters")
    parameters.pop("output_layer.weight")
    assert_tensors_close(parameters, reference["parameters"], atol=1e-6)


def test_dp2_gradients_match_dp1_on_the_same_global_batch(worker_runs):
    reference = step(worker_runs, "reference")
    for rank in (0, 1):
        result = step(worker_runs, f"dp2_rank{rank}")
        # Each rank saw half of the batch; after the all-reduce both hold the global gradient.
        assert_tensors_close(result["gradients"], reference["gradients"], atol=1e-6)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-6)
    losses = [step(worker_runs, f"dp2_rank{rank}")["losses"][0] for rank in (0, 1)]
    assert sum(losses) / 2 == pytest.approx(sum(reference["losses"]), rel=1e-6)


def test_distributed_optimizer_step_matches_dp1(worker_runs):
    reference = step(worker_runs, "reference")
    for rank in (0, 1):
        result = step(worker_runs, f"dp2_distopt_rank{rank}")
        assert result["succeeded"]
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-6)
        # Each rank updated its shard, then the updated parameters were all-gathered.
        assert_tensors_close(result["parameters"], reference["parameters"], atol=1e-6)


def test_gradient_clipping_and_the_optimizer_step(worker_runs):
    reference = step(worker_runs, "reference")
    assert reference["succeeded"]
    norm = reference["grad_norm"]
    expected_norm = torch.sqrt(
        sum(g.double().pow(2).sum() for g in reference["gradients"].values())
    )
    assert norm == pytest.approx(expected_norm.item(), rel=1e-6)
    assert norm > CLIP_GRAD  # so the step was clipped
    scale = CLIP_GRAD / (norm + 1e-6)
    for name, gradient in reference["gradients"].items():
        torch.testing.assert_close(reference["clipped_gradients"][name], gradient * scale, msg=name)
    # The step moved every parameter that had a gradient.
    hf = AutoModelForCausalLM.from_pretrained(worker_runs / "hf" / "llama_tied")
    before = hf.model.layers[0].mlp.down_proj.weight
    after = reference["parameters"]["decoder.layers.0.mlp.linear_fc2.weight"]
    assert not torch.equal(before, after)
    assert torch.isfinite(after).all()
