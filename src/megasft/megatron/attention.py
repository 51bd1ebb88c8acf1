"""Which attention and which kernels a training run uses (`--attention auto|te|torch`).

- `te`: Transformer Engine's fused attention on packed documents (THD with `cu_seqlens`).
  bf16 only: Transformer Engine has no attention kernel for fp32 in that layout.
- `torch`: `megasft.megatron.torch_attention` (SDPA, varlen flash attention or FlexAttention):
  packed documents on a GPU, rows with a document-causal mask on the CPU.
- `auto`: `te` where it works (a GPU, Transformer Engine installed, bf16), `torch` elsewhere.

Imports neither torch nor megatron-core, so settings are checked before any process starts.
See docs/train.md ("Attention").
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from megasft.errors import ConfigError

ATTENTION_CHOICES = ("auto", "te", "torch")


@dataclass(frozen=True)
class AttentionPlan:
    """The attention of a run and the layout of its micro-batches."""

    backend: str
    """"te" or "torch"."""
    packed: bool
    """Documents back to back in one sequence with `cu_seqlens` (THD), else [b, s] rows with
    a block-diagonal causal mask."""
    transformer_engine_layers: bool
    """Transformer Engine's linear and norm layers (where it is installed, on a GPU)."""


def transformer_engine_installed() -> bool:
    """True when the `transformer_engine` package can be found (it is not imported)."""
    return importlib.util.find_spec("transformer_engine") is not None


def choose_attention(
    requested: str, *, precision: str, on_accelerator: bool, transformer_engine: bool
) -> AttentionPlan:
    """The attention plan for `--attention requested`.

    Args:
        requested: one of ATTENTION_CHOICES.
        precision: "bf16" or "fp32".
        on_accelerator: a CUDA or ROCm device is present.
        transformer_engine: Transformer Engine is installed.

    Returns:
        The plan.

    Raises:
        ConfigError: `te` where Transformer Engine cannot run it, naming what is missing.
    """
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"--attention {requested}: choose one of {', '.join(ATTENTION_CHOICES)}")
    te_layers = on_accelerator and transformer_engine
    if requested == "te":
        if not te_layers:
            missing = (
                "this machine has no GPU"
                if not on_accelerator
                else "Transformer Engine is not installed (pip install -e '.[gpu]')"
            )
            raise ConfigError(
                f"--attention te needs Transformer Engine on a GPU, but {missing}; use "
                "--attention torch (or auto)"
            )
        if precision != "bf16":
            raise ConfigError(
                f"--attention te with --precision {precision}: Transformer Engine has no "
                "attention kernel for fp32 on packed documents (THD); use --precision bf16, "
                "or --attention torch (or auto) for fp32"
            )
        backend = "te"
    elif requested == "auto" and te_layers and precision == "bf16":
        backend = "te"
    else:
        backend = "torch"
    return AttentionPlan(
        backend=backend, packed=on_accelerator, transformer_engine_layers=te_layers
    )


def gradient_accumulation_fusion_available() -> bool:
    """True when Apex's `fused_weight_gradient_mlp_cuda` imports: megatron-core's own linear
    layers (the output layer among them) refuse `gradient_accumulation_fusion` without it,
    whatever Transformer Engine offers."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True
