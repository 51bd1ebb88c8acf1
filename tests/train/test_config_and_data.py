from __future__ import annotations

import json

import numpy as np
import pytest

from megasft.data.prepare import PrepareConfig, prepare
from megasft.data.store import open_split
from megasft.demo.tokenizer import build_tokenizer
from megasft.errors import ConfigError
from megasft.train.config import TrainConfig, build_config, check_against_model
from megasft.train.data import StepSampler, collate, steps_for_epochs

REQUIRED = {"data": "d", "load": "l", "save": "s"}


def test_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 2.0e-5\nglobal_batch_size: 16\ntrain_iters: 10\nmicro_batch_size: 2\n")
    config = build_config(recipe, **REQUIRED, lr=1e-5, micro_batch_size=None)
    assert config.lr == 1e-5 and config.global_batch_size == 16 and config.micro_batch_size == 2
    assert config.micro_batches == 8


def test_recipe_errors_name_the_setting(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        build_config(recipe, **REQUIRED, train_iters=1)
    with pytest.raises(ConfigError, match="--data"):
        build_config(None, load="l", save="s", train_iters=1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"global_batch_size": 6, "micro_batch_size": 4}, "--global-batch-size 6"),
        ({"nproc": 4, "tensor_parallel": 3}, "TP x PP x CP"),
        ({"epochs": 1.0}, "exactly one of"),
        ({"lr": 1e-5, "min_lr": 1e-4}, "--min-lr"),
        ({"precision": "fp8"}, "--precision"),
        ({"virtual_pipeline_stages": 2}, "--pp > 1"),
        ({"micro_batch_size": 0}, "--micro-batch-size"),
        ({"hidden_dropout": 1.0}, "--hidden-dropout must be below 1"),
        ({"attention_dropout": -0.1}, "--attention-dropout must not be negative"),
        ({"recompute": "some"}, "--recompute must be one of none, selective, full"),
        ({"recompute_layers": 2}, "--recompute-layers needs --recompute full"),
        ({"fp8": "e5m2"}, "--fp8 must be one of none, hybrid, e4m3"),
        ({"fp8": "hybrid", "precision": "fp32"}, "--fp8 hybrid needs --precision bf16"),
    ],
)
def test_bad_settings_fail_with_the_flag_named(settings, message):
    values = {**REQUIRED, "train_iters": 5, **settings}
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        TrainConfig(**values)


def test_every_bad_setting_is_named_in_one_error():
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**REQUIRED, micro_batch_size=0, precision="fp8", lr=0.0)
    assert str(caught.value) == (
        "4 problems: --micro-batch-size must be at least 1, got 0; --lr must be positive, "
        "got 0.0; --precision must be one of bf16, fp32, not 'fp8'; give exactly one of "
        "--train-iters and --epochs"
    )


def test_model_dependent_checks():
    config = TrainConfig(**REQUIRED, train_iters=1, nproc=2, tensor_parallel=2)
    hf = {
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "num_hidden_layers": 4,
        "max_position_embeddings": 128,
    }
    with pytest.raises(ConfigError, match="3 query groups"):
        check_against_model(config, hf, 64)
    with pytest.raises(ConfigError, match="max_position_embeddings 128"):
        check_against_model(TrainConfig(**REQUIRED, train_iters=1), hf, 256)
    with pytest.raises(ConfigError, match="4 layers"):
        check_against_model(
            TrainConfig(**REQUIRED, train_iters=1, nproc=3, pipeline_parallel=3), hf, 64
        )


def test_sampler_is_deterministic_sharded_and_reshuffles_per_epoch():
    def sampler(rank):
        return StepSampler(
            rows=10,
            global_batch_size=4,
            micro_batch_size=1,
            data_parallel_size=2,
            data_parallel_rank=rank,
            seed=7,
        )

    first, second = sampler(0), sampler(1)
    # The two ranks' shares of a step are disjoint and together make the global batch.
    for step in range(6):
        mine = np.concatenate(first.micro_batches(step) + second.micro_batches(step))
        assert mine.tolist() == first.global_batch(step).tolist()
    stream = np.concatenate([first.global_batch(s) for s in range(5)])  # 20 items = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:].tolist()
    assert sampler(0).global_batch(3).tolist() == first.global_batch(3).tolist()  # resumable
    assert steps_for_epochs(2.0, 10, 4) == 5


def prepared_split(tmp_path, examples: int):
    """The train split of `examples` tiny prompt/response rows, prepared at seq_length 64."""
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(examples)
        )
    )
    prepare(
        PrepareConfig(
            inputs=(str(data),),
            tokenizer=str(build_tokenizer(tmp_path / "tok")),
            output=str(tmp_path / "out"),
            seq_length=64,
            val_fraction=0.0,
            workers=1,
            progress=False,
        )
    )
    return open_split(tmp_path / "out")


def test_collate_pads_and_isolates_documents(tmp_path):
    table = prepared_split(tmp_path, examples=6)
    row = table.slice(0, 1).to_pylist()[0]
    batch = collate(table, np.array([0]), seq_length=64, pad_id=0)
    length = len(row["input_ids"])
    assert batch.tokens[0, :length].tolist() == row["input_ids"]
    assert batch.loss_mask[0, length:].sum() == 0
    assert batch.target_tokens == sum(row["loss_mask"][1:])
    first = row["seq_lengths"][0]
    assert batch.position_ids[0, first].item() == 0  # restarts at the second document
    assert bool(batch.attention_mask[0, 0, first, first - 1])  # no attention across documents


@pytest.mark.parametrize(
    "name",
    [
        "llama2-7b-sft-mi300x.yaml",
        "llama3.1-70b-sft-mi300x.yaml",
        "tiny-cpu.yaml",
        "qwen3-30b-a3b-sft-mi300x.yaml",
        "mixtral-8x7b-sft-mi300x.yaml",
    ],
)
def test_shipped_recipes_are_valid(name):
    from tests.conftest import REPO

    config = build_config(REPO / "recipes" / name, **REQUIRED)
    assert config.global_batch_size % (config.micro_batch_size * config.data_parallel) == 0


def test_train_iters_on_the_command_line_replaces_the_recipes_epochs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nwarmup_iters: 2\n")
    assert build_config(recipe, **REQUIRED).epochs == 3
    config = build_config(recipe, **REQUIRED, train_iters=20)
    assert (config.train_iters, config.epochs) == (20, None)
    with pytest.raises(ConfigError, match="--warmup-iters 2 must be below --train-iters 2"):
        build_config(recipe, **REQUIRED, train_iters=2)


def test_collate_fills_short_batches_with_rows_without_targets(tmp_path):
    batch = collate(prepared_split(tmp_path, examples=1), np.array([0]), 64, 0, rows=3)
    assert batch.tokens.shape == (3, 64) and batch.seq_lengths[1:] == [[], []]
    assert batch.loss_mask[1:].sum() == 0 and batch.target_tokens > 0
    assert not batch.attention_mask[1, 0].diagonal().any()  # padding still attends to itself
    assert (
        collate(
            open_split(tmp_path / "out"), np.array([0]), 64, 0, attention_mask=False
        ).attention_mask
        is None
    )


# --- PEFT settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(peft="lora", lora_rank=0), "--lora-rank must be at least 1, got 0"),
        (
            dict(peft="lora", lora_targets="linear_qkv,q_proj"),
            "--lora-targets: unknown target(s) q_proj; known: linear_qkv, linear_proj, "
            "linear_fc1, linear_fc2, output_layer",
        ),
        (dict(peft="dora"), "--peft must be one of lora, not 'dora'"),
        (dict(peft="lora", lora_dropout=1.0), "--lora-dropout must be in [0, 1), got 1.0"),
    ],
)
def test_bad_peft_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(data="d", load="l", save="s", train_iters=2, **settings)
    assert str(error.value) == message


def test_lora_on_an_output_layer_tied_to_the_embedding_is_refused_naming_the_target():
    from megasft.megatron.architecture import architecture_from_hf_config
    from megasft.train.config import check_against_experts
    from tests.checkpoint.tiny_models import TINY_MODELS

    def architecture(name: str):
        return architecture_from_hf_config(TINY_MODELS[name].build().config.to_dict())

    targets = "linear_qkv,output_layer"
    config = TrainConfig(**REQUIRED, train_iters=2, peft="lora", lora_targets=targets)
    check_against_experts(config, architecture("llama"))  # untied: its own lm_head
    with pytest.raises(ConfigError) as error:
        check_against_experts(config, architecture("llama_tied"))
    assert str(error.value).startswith(
        "--lora-targets output_layer: the model ties its output layer to the input embedding"
    )


def test_lora_defaults_adapt_every_linear_of_a_layer():
    config = TrainConfig(data="d", load="l", save="s", train_iters=2, peft="lora")
    settings = config.peft_settings
    assert settings.targets == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert (settings.rank, settings.alpha, settings.scaling) == (16, 32.0, 2.0)
    assert TrainConfig(data="d", load="l", save="s", train_iters=2).peft_settings is None
