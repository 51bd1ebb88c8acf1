"""A norm for megatron-core's local layers (the CPU path) that also runs under sequence parallelism.

megatron-core's local layer spec builds RMSNorm as `WrappedTorchNorm`, which refuses sequence
parallelism: under it each tensor-parallel rank normalises its own slice of the sequence, so
the norm weights' gradients are partial sums to be added over the TP group, which
megatron-core's `finalize_model_grads` does for parameters marked `sequence_parallel`, a mark
`WrappedTorchNorm` does not set. `SequenceParallelNorm` is the same torch norm with the mark.
MoE training at TP > 1 needs it on CPU: megatron-core's MoE layer refuses to train with TP but
without sequence parallelism. See docs/train.md ("Mixture of experts").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelNorm:
    """Builds the torch norm that `WrappedTorchNorm` builds, its weights marked for
    megatron-core's gradient all-reduce over TP when sequence parallelism is on."""

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs: Any
    ) -> torch.nn.Module:
        """Args:
        config: the model's config (its `normalization` and `sequence_parallel`).
        hidden_size: the normalised width.
        eps: the norm's epsilon.
        **kwargs: `WrappedTorchNorm`'s other arguments, which it does not use either.
        """
        norm = _NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for parameter in norm.parameters():
            parameter.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec: Any) -> Any:
    """`spec` with `SequenceParallelNorm` in place of every `WrappedTorchNorm` in it.

    Args:
        spec: a megatron-core module spec, a submodules dataclass, a module class, or a
            `functools.partial` of a module class (megatron-core 0.19).

    Returns:
        A new spec (the given one is not changed).
    """
    if spec is WrappedTorchNorm:
        return SequenceParallelNorm
    if isinstance(spec, functools.partial):  # megatron-core 0.19's builders of some modules
        return functools.partial(
            spec.func,
            *(with_sequence_parallel_norms(value) for value in spec.args),
            **{key: with_sequence_parallel_norms(value) for key, value in spec.keywords.items()},
        )
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=with_sequence_parallel_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(
            spec,
            **{
                field.name: with_sequence_parallel_norms(getattr(spec, field.name))
                for field in dataclasses.fields(spec)
                if field.init
            },
        )
    return spec
