"""megatron-core for megasft: the model of an HF architecture, distributed init, and CPU runs.

- `architecture`: `ModelArchitecture`, read from a Hugging Face config.json, saved as JSON.
- `families`: one module per model family (llama, mistral, qwen2, qwen3) in a registry: its
  HF names, config reading, megatron-core settings, layer spec and weight-mapping table.
- `hf_config`: typed reading of config.json fields, and RoPE settings.
- `builder`: `transformer_config()` and `build_model()` (a `GPTModel` of any TP/PP stage).
- `parallel`: `initialize_parallel()` for torchrun or one process, on GPUs or on CPU (gloo).
- `weights`: `load_weights()` of a converted or trained checkpoint at any TP/PP.
- `cpu`: the opt-in emulation layer that runs unmodified megatron-core on CPU.
- `compat`: the differences between the tested megatron-core versions (0.16.1, 0.19.2).
- `rope`: RoPE frequencies megatron-core does not compute the Hugging Face way (Llama 3.1).

`architecture`, `families`, `hf_config`, `rope`, `cpu`, `compat` and `parallel` can be imported without
importing megatron-core.
"""
