"""The config.json fields of published models, written out here (nothing is downloaded), with
their parameter counts as their model cards and Hugging Face's safetensors index state them."""

from __future__ import annotations

from megasft.megatron.architecture import ModelArchitecture, architecture_from_hf_config

LLAMA2_7B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
LLAMA31_70B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=False,
)
LLAMA31_8B = LLAMA31_70B | dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32
)
QWEN25_7B = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)
QWEN3_8B = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)
MIXTRAL_8X7B = dict(
    model_type="mixtral",
    architectures=["MixtralForCausalLM"],
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
    vocab_size=32000,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    sliding_window=None,
    tie_word_embeddings=False,
)

PARAMETERS = {
    "llama2-7b": (LLAMA2_7B, 6_738_415_616),
    "llama3.1-8b": (LLAMA31_8B, 8_030_261_248),
    "llama3.1-70b": (LLAMA31_70B, 70_553_706_496),
    "qwen2.5-7b": (QWEN25_7B, 7_615_616_512),
    "qwen3-8b": (QWEN3_8B, 8_190_735_360),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, 30_532_122_624),
    "mixtral-8x7b": (MIXTRAL_8X7B, 46_702_792_704),
}


def architecture(config: dict) -> ModelArchitecture:
    return architecture_from_hf_config(config, "known_models")


DEMO_TINY_LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
"""The demo's model (megasft.demo.model.build_tiny_llama with its defaults)."""
