"""LoRA training end to end on CPU: exact at every parallel layout, adapters-only checkpoints
that resume exactly, and a base that must not change under them (see lora_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.launching import result_of, run_mode

pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "train" / "lora_worker.py"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def lora_single(workspace) -> dict:
    """The LoRA scenarios in one process, on the folder's shared workspace (conftest.py)."""
    return run_mode(WORKER, "lora_single", workspace.root)


@pytest.fixture(scope="module")
def lora_parallel(workspace) -> dict:
    return run_mode(WORKER, "lora_parallel", workspace.root, processes=2)


def test_lora_learns_from_the_base_models_first_loss(lora_single):
    losses = result_of(lora_single, "reference")["losses"]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.1  # B starts at zero: step 1 is the base model's loss


@pytest.mark.parametrize("layout", ["tp2", "dp2", "pp2"])
def test_lora_at_a_parallel_layout_reproduces_the_single_rank_curve(
    lora_single, lora_parallel, layout
):
    reference, result = result_of(lora_single, "reference"), result_of(lora_parallel, layout)
    assert result["target_tokens"] == reference["target_tokens"]
    for actual, expected in zip(result["losses"], reference["losses"], strict=True):
        assert abs(actual - expected) < TOLERANCE
    for actual, expected in zip(result["grad_norms"], reference["grad_norms"], strict=True):
        assert abs(actual - expected) < TOLERANCE * expected


def test_tp2_gathers_the_output_layers_adapter_to_the_single_rank_logits(
    lora_single, lora_parallel
):
    """A TP2 checkpoint, read back at TP2 into a model that gathers its logits: the output
    layer's adapter (B split by vocabulary rows) gathers too, to the TP1 run's logits."""
    import torch

    reference, result = result_of(lora_single, "reference"), result_of(lora_parallel, "tp2")
    expected, actual = torch.load(reference["logits"]), torch.load(result["logits"])
    assert actual["logits"].shape == expected["logits"].shape
    assert torch.allclose(actual["logits"], expected["logits"], atol=1e-4)


def test_checkpoint_holds_the_adapters_their_adam_state_and_the_base_reference(
    workspace, lora_single
):
    result = result_of(lora_single, "trainable")
    targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    model_keys = {key for key in result["keys"] if not key.startswith("optimizer.")}
    assert model_keys == {
        f"decoder.layers.{parent}.{target}.adapter.lora_{part}"
        for target in targets
        for parent in ("self_attention" if target in targets[:2] else "mlp",)
        for part in "ab"
    } | {"output_layer.adapter.lora_a", "output_layer.adapter.lora_b"}
    assert all(".adapter." in key for key in result["keys"])  # no base weight, no base state
    peft = result["peft"]
    assert (peft["method"], peft["rank"], peft["alpha"]) == ("lora", 4, 8.0)
    assert peft["base"]["checkpoint"] == str(workspace.mcore_model.resolve())
    assert peft["base"]["sha256"].startswith("sha256:")


def test_lora_run_resumes_exactly(lora_single):
    result = result_of(lora_single, "resume_in_process")
    assert result["steps"] == [1, 2, 3, 4, 5, 6]
    assert result["again"] == result["first"]


def test_resuming_on_another_base_is_refused_naming_load(lora_single):
    refused = result_of(lora_single, "other_base")["refused"]
    assert refused is not None and refused.startswith("--load ")
    assert "is not the base the adapters" in refused


# --- export: merged model and Hugging Face PEFT adapter -----------------------------------------


def test_peft_adapter_and_merged_model_give_megatrons_logits(workspace, lora_single, tmp_path):
    """The merged HF model, the PEFT adapter on the HF base, and megatron's own forward of the
    trained checkpoint: the same logits (fp32)."""
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from megasft.checkpoint.convert import convert
    from megasft.checkpoint.errors import CheckpointError

    result = result_of(lora_single, "reference")
    run_dir = Path(result["checkpoint"]).parent  # --save: its newest checkpoint is taken
    with pytest.raises(CheckpointError, match="^--base is required"):
        convert("megatron", "hf", run_dir, tmp_path / "no-base")
    convert("megatron", "hf", run_dir, tmp_path / "merged", base=workspace.hf_model)
    convert("megatron", "hf", result["checkpoint"], tmp_path / "adapter",
            base=workspace.hf_model, adapter_only=True)  # fmt: skip
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        lm_head_b = weights.get_tensor("base_model.model.lm_head.lora_B.weight")
    vocab_size = json.loads((workspace.hf_model / "config.json").read_text())["vocab_size"]
    assert lm_head_b.shape == (vocab_size, 4)  # B without megatron's vocabulary-padding rows
    expected = torch.load(result["logits"])

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(expected["tokens"]).logits

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager")  # fmt: skip

    merged = logits(load(tmp_path / "merged"))
    adapted = logits(peft.PeftModel.from_pretrained(load(workspace.hf_model), tmp_path / "adapter"))
    base = logits(load(workspace.hf_model))
    assert (merged - base).abs().max() > 1e-2  # the adapters changed the model
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert torch.allclose(merged, expected["logits"], atol=1e-4)

    # `megasft evaluate` loads the adapter on its --base, and refuses it without one
    from megasft.errors import ConfigError
    from megasft.evaluate.model import check_model, load_model

    loaded = load_model(tmp_path / "adapter", None, torch.device("cpu"), torch.float32,
                        True, tmp_path / "scratch", convert_base=workspace.hf_model)  # fmt: skip
    assert loaded.description["kind"] == "adapter"
    assert torch.allclose(logits(loaded.model), merged, atol=1e-4)
    with pytest.raises(ConfigError, match="is a LoRA adapter: pass its base model as --base"):
        check_model(tmp_path / "adapter", None, True)


def test_adapter_only_without_base_is_refused():
    from megasft.checkpoint.cli import ConvertConfig
    from megasft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--adapter-only needs --base"):
        ConvertConfig(source_format="megatron", target_format="hf", src="a", dst="b",
                      adapter_only=True)  # fmt: skip


def test_bf16_lora_keeps_fp32_main_weights_for_the_adapters_only(lora_single):
    result = result_of(lora_single, "bf16")
    assert len(result["losses"]) == 2 and result["losses"][1] < result["losses"][0]
    main_weights = {key for key in result["keys"] if key.startswith("optimizer.state.fp32_param.")}
    assert len(main_weights) == 10  # A and B of 5 linears, what the export merges in fp32
    assert all(".adapter." in key for key in result["keys"])


def test_lora_with_the_distributed_optimizer_resumes_exactly(lora_parallel):
    result = result_of(lora_parallel, "dp2_distributed_optimizer_resume")
    assert len(result["first"]) == 4
    assert result["again"] == result["first"]
