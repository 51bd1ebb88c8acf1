"""megatron-core for megasft: the model of an HF architecture, distributed init, and CPU runs.

`architecture` (`ModelArchitecture`), `families` (one module per model family, MoE ones
included, in a registry), `hf_config`, `builder` (`transformer_config()`, `build_model()`),
`parallel`, `weights` (`load_weights()`), `cpu` (the CPU emulation layer), `compat` (the
differences between the tested megatron-core versions), `rope`, and for MoE models
`moe_router` (routing as transformers does) and `norms` (a local norm under sequence
parallelism). All but `builder`, `weights`, `moe_router` and `norms` import without
megatron-core. What each module holds: docs/convert.md, "Building the model (for the trainer)".
"""
