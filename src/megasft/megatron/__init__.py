"""megatron-core for megasft: the model of an HF architecture, distributed init, and CPU runs.

`architecture` (`ModelArchitecture`), `families` (one module per model family, MoE ones
included, in a registry), `hf_config`, `builder` (`transformer_config()`, `build_model()`),
`parallel`, `weights` (`load_weights()`), `cpu` (the CPU emulation layer), `compat` (the
differences between the tested megatron-core versions), `rope`, `attention` (which core
attention a run uses), `torch_attention` (the core attention on torch alone), and for MoE
models `moe_router` (routing as transformers does) and `norms` (a local norm under sequence
parallelism). All but `builder`, `weights`, `torch_attention`, `moe_router` and `norms` import
without megatron-core. What each module holds: docs/convert.md, "Building the model (for the
trainer)"; the attention: docs/train.md, "What a step computes".
"""
