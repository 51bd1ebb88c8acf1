"""`megasft plan` without a model: parameter counts of published models, the distributed
optimizer's buffer layout by hand, the device table, the verdict and the command line."""

from __future__ import annotations

import json

import pytest

from megasft.cli import main
from megasft.errors import ConfigError
from megasft.plan.buffers import buffer_layout, shard_elements
from megasft.plan.devices import GIB, device_memory_bytes
from megasft.plan.layout import Layout
from megasft.plan.memory import plan_memory, suggestions
from megasft.plan.parameters import PlannedParameter, chunk_parameters, model_parameter_count
from tests.plan.conftest import LORA, peft_settings
from tests.plan.known_models import (
    LLAMA2_7B,
    LLAMA31_70B,
    PARAMETERS,
    QWEN3_30B_A3B,
    architecture,
)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_counts_of_published_models(name):
    config, published = PARAMETERS[name]
    assert model_parameter_count(architecture(config)) == published


def test_every_rank_of_a_layout_holds_the_model_once():
    model = architecture(LLAMA31_70B)
    layout = Layout(seq_length=4096, world_size=8, tensor_parallel=4, pipeline_parallel=2)
    held = 0
    for stage in range(2):
        for parameter in chunk_parameters(model, layout, stage):
            replicated = "norm" in parameter.name  # every TP rank holds the norms whole
            held += parameter.numel * (1 if replicated else 4)
    assert held == model_parameter_count(model)


def test_every_rank_of_an_expert_parallel_layout_holds_the_model_once():
    model = architecture(QWEN3_30B_A3B)
    layout = Layout(
        seq_length=4096, world_size=16, tensor_parallel=2, pipeline_parallel=2,
        expert_parallel=4, expert_tensor_parallel=2, global_batch_size=4,
    )  # fmt: skip
    held = 0
    for stage in range(2):
        parameters = chunk_parameters(model, layout, stage)
        # each layer: the 128 experts over EP 4, 32 here, each fc1 and fc2 split over ETP 2
        assert sum(".mlp.experts." in p.name for p in parameters) == 24 * 32 * 2
        for parameter in parameters:
            if ".mlp.experts." in parameter.name:
                assert parameter.expert_parallel
                held += parameter.numel * 4 * 2  # EP x ETP ranks hold the others
            elif "norm" in parameter.name or "router" in parameter.name:
                held += parameter.numel  # every TP rank holds the norms and routers whole
            else:
                held += parameter.numel * 2
    assert held == model_parameter_count(model)


def test_distributed_optimizer_layout_by_hand():
    parameters = [
        PlannedParameter("a", (100,)),
        PlannedParameter("b", (64,)),
        PlannedParameter("c", (10,)),
    ]
    # reverse order: c at 0..10, b from 64 (a multiple of 64), a from 128; the bucket is then
    # padded to lcm(2 ranks, 128) = 256 elements, 128 per rank
    layout = buffer_layout(parameters, shards=2, distributed_optimizer=True, bucket_elements=None)
    assert layout.ranges == ((128, 228, 0), (64, 128, 0), (0, 10, 0))
    assert layout.numel == 256
    assert shard_elements(layout, 2) == [10 + 64, 100]
    plain = buffer_layout(parameters, shards=2, distributed_optimizer=False, bucket_elements=None)
    assert plain.numel == 174


def test_shared_embedding_gets_a_bucket_of_its_own():
    parameters = [
        PlannedParameter("embedding", (256, 8), shared_embedding=True),
        PlannedParameter("w", (8,)),
    ]
    layout = buffer_layout(parameters, shards=4, distributed_optimizer=True, bucket_elements=None)
    assert layout.buckets == ((0, 128), (128, 128 + 2048))


def test_device_table_and_override():
    assert device_memory_bytes("MI300X") == ("mi300x", 192 * GIB)
    assert device_memory_bytes(None, 40) == ("mi300x", 40 * GIB)
    assert device_memory_bytes("a100", 80)[1] == 80 * GIB
    with pytest.raises(ConfigError, match="--device 'a100' is not in the table"):
        device_memory_bytes("a100")


def test_llama2_7b_on_8_mi300x_fits_and_its_static_parts_follow_the_bytes_per_parameter():
    model = architecture(LLAMA2_7B)
    layout = Layout(seq_length=4096, world_size=8, global_batch_size=128)
    plan = plan_memory(model, layout, *device_memory_bytes("mi300x"))
    static, parameters = plan.worst.static, 6_738_415_616
    assert plan.fits
    # bf16 weights, fp32 gradients, 12 bytes of main weights and Adam states over 8 ranks;
    # the distributed optimizer's padding adds less than 64 elements per parameter
    assert 0 <= static.weights - 2 * parameters < 2 * 64 * 300
    assert 0 <= static.gradients - 4 * parameters < 4 * 64 * 300
    assert abs(static.main_weights + static.optimizer_states - 12 * parameters / 8) < 12 * 64 * 300


def test_activations_follow_korthikanti_scaling():
    """Linear in micro-batch and layers, divided by TP with sequence parallelism, and full
    recompute keeps only each layer's input (2sbh bytes in bf16)."""
    model = architecture(LLAMA2_7B)

    def stored(**changes):
        layout = Layout(seq_length=4096, world_size=8, global_batch_size=64, **changes)
        return plan_memory(model, layout, "mi300x", 192 * GIB).worst.activations.stored

    one, two = stored(), stored(micro_batch_size=2)
    assert two == pytest.approx(2 * one, rel=1e-6)
    assert stored(tensor_parallel=8) < one / 7
    per_layer = 2 * 4096 * 4096  # 2sbh
    # the layers' inputs, then the final norm, the output layer's input and the fp32 softmax
    output_part = 4096 * (2 * 4096 + 4 + 2 * 4096 + 4 * 32000)
    assert stored(recompute="full") == 32 * per_layer + output_part


def test_pipeline_first_stage_keeps_a_micro_batch_per_stage():
    model = architecture(LLAMA31_70B)
    layout = Layout(seq_length=4096, world_size=8, tensor_parallel=2, pipeline_parallel=4,
                    global_batch_size=64)  # fmt: skip
    plan = plan_memory(model, layout, "mi300x", 192 * GIB)
    assert [stage.activations.in_flight for stage in plan.stages] == [4, 3, 2, 1]


def test_a_plan_that_does_not_fit_names_the_changes_that_would():
    model = architecture(LLAMA2_7B)
    layout = Layout(seq_length=4096, world_size=8, micro_batch_size=8, global_batch_size=128)
    plan = plan_memory(model, layout, *device_memory_bytes("h100"))
    assert not plan.fits
    found = dict(suggestions(plan))
    assert "--recompute full" in found and found["--recompute full"].fits
    assert "--micro-batch-size 4" not in found  # halving is not enough here


def test_an_moe_plan_names_expert_parallelism_and_lora_on_its_attention():
    # Qwen3-30B-A3B whole on each of 8 MI300X: 30.5 B parameters' weights and fp32 gradients
    # alone are 171 GiB
    model = architecture(QWEN3_30B_A3B)
    plan = plan_memory(
        model, Layout(seq_length=4096, world_size=8, global_batch_size=8), "mi300x", 192 * GIB
    )
    assert not plan.fits
    found = dict(suggestions(plan))
    # EP 2 halves the experts' weights and gradients (about 85% of the model's)
    static = plan.worst.static
    assert found["--ep 2"].worst.static.gradients < 0.6 * static.gradients
    assert found["--peft lora --lora-targets linear_qkv,linear_proj"].fits
    assert "--peft lora" not in found  # the trainer refuses adapters on the experts
    lora_on_mlp = plan.layout.replace(peft=peft_settings({"peft": LORA}))
    with pytest.raises(ConfigError, match="MoE model adapts the attention projections only"):
        plan_memory(model, lora_on_mlp, "mi300x", 192 * GIB)


def test_lora_on_a_tied_output_layer_is_refused_as_the_trainer_refuses_it():
    model = architecture(LLAMA2_7B | {"tie_word_embeddings": True})
    targets = {"lora_targets": "linear_qkv,output_layer"}
    layout = Layout(
        seq_length=4096, world_size=8, global_batch_size=8,
        peft=peft_settings({"peft": LORA | targets}),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--lora-targets output_layer: the model ties"):
        plan_memory(model, layout, "mi300x", 192 * GIB)
    untied = architecture(LLAMA2_7B)
    assert plan_memory(untied, layout, "mi300x", 192 * GIB).fits


@pytest.fixture()
def hf_model(tmp_path):
    directory = tmp_path / "llama2-7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA2_7B))
    return directory


def test_cli_prints_the_parts_and_exits_0_when_it_fits(hf_model, capsys):
    code = main(["plan", "--model", str(hf_model), "--seq-length", "4096", "--nproc", "8",
                 "--global-batch-size", "128"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for part in ("weights", "gradients", "fp32 main weights", "optimizer states", "activations",
                 "allowance", "total", "verdict: fits"):  # fmt: skip
        assert part in out


def test_cli_exits_1_naming_what_to_change_when_it_does_not_fit(hf_model, capsys):
    code = main(["plan", "--model", str(hf_model / "config.json"), "--seq-length", "4096",
                 "--device", "h100", "--micro-batch-size", "8", "--global-batch-size", "8"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "verdict: does not fit" in out and "--recompute full" in out


def test_cli_takes_a_recipe_and_prints_json(hf_model, capsys):
    code = main(["plan", "--config", "recipes/llama2-7b-sft-mi300x.yaml", "--model", str(hf_model),
                 "--seq-length", "4096", "--json"])  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["fits"] and record["device"] == "mi300x"
    assert record["parts"]["total"] == sum(v for k, v in record["parts"].items() if k != "total")


def test_cli_takes_the_expert_parallel_size(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(QWEN3_30B_A3B))
    arguments = ["plan", "--model", str(config), "--seq-length", "4096", "--nproc", "8",
                 "--global-batch-size", "8", "--json"]  # fmt: skip
    assert main(arguments) == 1  # every expert on every GPU
    capsys.readouterr()
    assert main([*arguments, "--ep", "8"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert "EP 8 x ETP 1 x expert-DP 1" in record["layout"]


def test_cli_without_a_sequence_length_is_a_usage_error(hf_model, capsys):
    assert main(["plan", "--model", str(hf_model)]) == 2
    assert "give --seq-length, or --data" in capsys.readouterr().err


def test_cli_reads_a_converted_checkpoints_architecture(tmp_path, capsys):
    (tmp_path / "architecture.json").write_text(architecture(LLAMA2_7B).to_json())
    assert main(["plan", "--load", str(tmp_path), "--seq-length", "2048"]) == 0
    assert "6.74 B parameters" in capsys.readouterr().out
