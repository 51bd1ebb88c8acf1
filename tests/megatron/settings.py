"""What the megatron worker runs are asked to do (shared by conftest.py and the tests)."""

TRAINING_MODEL = "llama_tied"
"""The model of the training checks: tied embeddings make PP=2 all-reduce the embedding
gradient between the first and the last stage, as finalize_model_grads must."""
RESAVED_MODEL = "qwen2"
"""Re-saved by megatron-core at TP=2 and exported again (its QKV biases are TP-sharded too)."""
LEARNING_RATE = 1e-3
CLIP_GRAD = 0.05
"""Small enough that every step is clipped, so clipping is exercised."""
GROUPED_MODEL = "qwen3_moe_dense"
"""Loaded into the grouped-GEMM expert layout and re-saved from it (a dense layer beside an MoE
one, so per-layer checkpoint keys too)."""
