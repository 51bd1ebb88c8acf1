"""Parameter-efficient fine-tuning on megatron-core: a registry of PEFT methods.

Each method is one module (`lora`) that registers a `PeftMethod`: it wraps the chosen
parallel linears of a built model with trainable adapters and freezes everything else. The
rest of megasft asks the registry (`method_named`) and never compares a method's name.
See docs/peft.md.
"""

from megasft.megatron.peft import lora  # noqa: F401  (registers "lora")
from megasft.megatron.peft.registry import (
    ADAPTER_MODULE,
    PeftMethod,
    PeftSettings,
    method_named,
    method_names,
    register,
)

__all__ = [
    "ADAPTER_MODULE",
    "PeftMethod",
    "PeftSettings",
    "method_named",
    "method_names",
    "register",
]
