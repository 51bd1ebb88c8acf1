"""Training settings of mixture-of-experts models, checked without training: the expert
parallel sizes against the world and the model, the load-balancing coefficient's default,
and FLOPs counted from the active parameters."""

from __future__ import annotations

import dataclasses

import pytest

from megasft.errors import ConfigError
from megasft.megatron.architecture import MoEArchitecture, architecture_from_hf_config
from megasft.train.config import TrainConfig, check_against_experts
from megasft.train.metrics import model_flops
from megasft.train.moe import moe_settings
from tests.checkpoint.tiny_models import TINY_MODELS

REQUIRED = {"data": "d", "load": "l", "save": "s", "train_iters": 5}


def architecture(name: str):
    return architecture_from_hf_config(TINY_MODELS[name].build().config.to_dict())


def test_a_world_that_ep_etp_and_pp_do_not_divide_is_refused_naming_them():
    with pytest.raises(ConfigError, match=r"world size 6 .* EP x ETP x PP = 4 x 1 x 1 = 4 \(--ep"):
        TrainConfig(**REQUIRED, nproc=6, expert_parallel=4)
    with pytest.raises(ConfigError, match=r"EP x ETP x PP = 2 x 2 x 1 = 4"):
        TrainConfig(**REQUIRED, nproc=2, expert_parallel=2, tensor_parallel=2)
    # ETP 1 below TP 2: the experts' ranks are TP's two, split by EP instead.
    config = TrainConfig(
        **REQUIRED, nproc=2, expert_parallel=2, expert_tensor_parallel=1, tensor_parallel=2
    )
    assert (config.expert_tensor_size, config.data_parallel) == (1, 1)
    assert TrainConfig(**REQUIRED, nproc=4, expert_parallel=2).expert_tensor_size == 1


def test_expert_parallel_sizes_must_fit_the_experts():
    mixtral = architecture("mixtral")  # 4 experts of width 128
    check_against_experts(TrainConfig(**REQUIRED, nproc=4, expert_parallel=4), mixtral)
    with pytest.raises(ConfigError, match="--ep 8 does not divide the model's 4 experts"):
        check_against_experts(TrainConfig(**REQUIRED, nproc=8, expert_parallel=8), mixtral)
    with pytest.raises(ConfigError, match=r"--etp 3 does not divide the experts' intermediate"):
        check_against_experts(
            TrainConfig(**REQUIRED, nproc=3, tensor_parallel=3, expert_tensor_parallel=3), mixtral
        )
    with pytest.raises(ConfigError, match="the model \\(llama\\) has no experts; use --ep 1"):
        check_against_experts(
            TrainConfig(**REQUIRED, nproc=2, expert_parallel=2), architecture("llama")
        )


def test_load_balancing_coefficient_defaults_to_the_models_and_can_be_set():
    qwen3_moe = architecture("qwen3_moe")
    config = TrainConfig(**REQUIRED)
    assert moe_settings(config, qwen3_moe) == {
        "moe_aux_loss_coeff": 0.001,  # router_aux_loss_coef of its config.json
        "moe_token_dispatcher_type": "alltoall",
        "sequence_parallel": False,
    }
    tuned = TrainConfig(
        **REQUIRED, moe_aux_loss_coeff=0.0, moe_token_dispatcher="allgather", tensor_parallel=2,
        nproc=2,
    )  # fmt: skip
    assert moe_settings(tuned, qwen3_moe) == {
        "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "allgather",
        "sequence_parallel": True,  # megatron-core's MoE layer trains at TP > 1 only with it
    }
    assert moe_settings(config, architecture("llama")) == {}


def test_moe_flops_count_the_active_experts_only():
    # Qwen3-30B-A3B: 48 MoE layers of 128 experts of width 768, 8 active: 3.3e9 active
    # parameters (of 30.5e9), of which all but the input embedding are multiplied.
    dense = dict(
        family="qwen3_moe", num_layers=48, hidden_size=2048, ffn_hidden_size=6144,
        num_attention_heads=32, num_query_groups=4, head_dim=128, vocab_size=151936,
        padded_vocab_size=151936, max_position_embeddings=40960, norm_epsilon=1e-6,
        rope_theta=1e6, rope_scaling=None, qkv_bias=False, qk_layernorm=True,
        tied_embeddings=False, sliding_window=None,
    )  # fmt: skip
    moe = MoEArchitecture(
        num_experts=128,
        router_topk=8,
        expert_ffn_hidden_size=768,
        normalize_topk=True,
        moe_layers=tuple(range(48)),
        aux_loss_coeff=0.001,
    )
    qwen3_30b = architecture_from_fields(dense, moe)
    attention = 2048 * (32 * 128 + 2 * 4 * 128) + 32 * 128 * 2048
    experts = 8 * 3 * 2048 * 768 + 2048 * 128  # active experts and the router
    active = 48 * (attention + experts) + 2048 * 151936
    assert active + 2048 * 151936 == pytest.approx(3.3e9, rel=0.03)
    causal = 6 * 48 * 32 * 128  # per n^2
    assert model_flops(qwen3_30b, [1000]) == pytest.approx(6 * active * 1000 + causal * 1000**2)
    # A dense layer instead of the first MoE one counts its whole MLP.
    mixed = dataclasses.replace(
        qwen3_30b, moe=dataclasses.replace(moe, moe_layers=tuple(range(1, 48)))
    )
    difference = model_flops(mixed, [1]) - model_flops(qwen3_30b, [1])
    assert difference == pytest.approx(6 * (3 * 2048 * 6144 - experts))


def architecture_from_fields(fields: dict, moe: MoEArchitecture):
    from megasft.megatron.architecture import ModelArchitecture

    return ModelArchitecture(**fields, moe=moe)


def test_lora_on_an_moe_model_covers_the_attention_projections():
    qwen3_moe = architecture("qwen3_moe")
    attention = TrainConfig(**REQUIRED, peft="lora", lora_targets="linear_qkv,linear_proj")
    check_against_experts(attention, qwen3_moe)
    with pytest.raises(ConfigError, match="--lora-targets linear_fc1,linear_fc2: an MoE model"):
        check_against_experts(TrainConfig(**REQUIRED, peft="lora"), qwen3_moe)
    with pytest.raises(ConfigError, match="mixes dense and MoE layers"):
        check_against_experts(attention, architecture("qwen3_moe_dense"))


def test_sequence_parallelism_is_on_at_tp2_on_gpus_and_for_moe_models_on_cpu_too():
    import torch

    from megasft.train.build import uses_sequence_parallel
    from megasft.train.distributed import Parallel

    def parallel(on_accelerator: bool) -> Parallel:
        return Parallel(
            device=torch.device("cpu"), on_accelerator=on_accelerator, rank=0, world_size=2,
            tensor_rank=0, pipeline_rank=0, context_rank=0, data_rank=0, data_size=1,
            owns_process_group=False,
        )  # fmt: skip

    tp2, tp1 = TrainConfig(**REQUIRED, nproc=2, tensor_parallel=2), TrainConfig(**REQUIRED)
    dense, moe = architecture("llama"), architecture("qwen3_moe")
    assert uses_sequence_parallel(tp2, parallel(True), dense)
    assert not uses_sequence_parallel(tp2, parallel(False), dense)  # local layers refuse it
    assert uses_sequence_parallel(tp2, parallel(False), moe)  # as moe_settings turns it on
    assert moe_settings(tp2, moe)["sequence_parallel"]
    assert not uses_sequence_parallel(tp1, parallel(True), moe)
