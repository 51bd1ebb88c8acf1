"""Model families (llama, mistral, qwen2, qwen3, ...): one module each, in a registry.

A family holds everything that differs between model families: the Hugging Face names it
accepts, how its config.json becomes a `ModelArchitecture`, the megatron-core settings and
layer spec that build it, and its weight-mapping table (`base.ModelFamily`). Importing this
package imports every module in it, so a new family is one new module whose `ModelFamily`
subclass is decorated with `@register`. Nothing outside these modules compares family names.
See docs/convert.md ("Adding a model family").
"""

from __future__ import annotations

import importlib
import pkgutil

from megasft.megatron.families.base import ModelFamily
from megasft.megatron.families.registry import family_named, names, register

__all__ = ["ModelFamily", "family_named", "names", "register"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
