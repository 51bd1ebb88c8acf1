"""A LoRA adapter around a megatron-core (or Transformer Engine) parallel linear, exact at any TP.

Column-parallel base (W sharded by output rows):  A [r, in] replicated, B [out/tp, r] sharded
like W's rows, so each rank adds its own slice of B A x. Row-parallel base (W sharded by input
columns): A [r, in/tp] sharded like W's columns, B [out, r] replicated; the partial products
A_i x_i are summed over TP (in r dimensions, the smallest place to reduce) before B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megasft.megatron.peft.registry import ADAPTER_MODULE, PeftSettings


def parallel_mode(base: torch.nn.Module) -> str:
    """ "column" or "row": how `base` splits its weight over tensor-parallel ranks."""
    mode = getattr(base, "parallel_mode", None)  # Transformer Engine's linears say it
    if mode in ("column", "row"):
        return mode
    if isinstance(base, tensor_parallel.ColumnParallelLinear):
        return "column"
    if isinstance(base, tensor_parallel.RowParallelLinear):
        return "row"
    raise TypeError(f"LoRA cannot wrap a {type(base).__name__}: not a parallel linear")


class LoraAdapter(torch.nn.Module):
    """The trainable pair: `lora_a` [r, in(/tp)], `lora_b` [out(/tp), r], in the base's dtype."""

    def __init__(
        self,
        mode: str,
        in_full: int,
        out_full: int,
        settings: PeftSettings,
        *,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
        device: torch.device,
        init_seed: int,
        sequence_parallel: bool,
    ):
        super().__init__()
        self.mode, self.scaling, self.sequence_parallel = mode, settings.scaling, sequence_parallel
        generator = torch.Generator().manual_seed(init_seed)
        bound = 1 / math.sqrt(in_full)  # kaiming_uniform(a=sqrt(5)), PEFT's default for A
        a_full = (torch.rand(settings.rank, in_full, generator=generator) * 2 - 1) * bound
        if mode == "column":
            a, b = a_full, torch.zeros(out_full // tp_size, settings.rank)
        else:
            a = a_full.chunk(tp_size, dim=1)[tp_rank]
            b = torch.zeros(out_full, settings.rank)
        self.lora_a = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.lora_b = torch.nn.Parameter(b.to(device=device, dtype=dtype))
        if mode == "column":  # B split by rows, like W
            sharded, replicated, axis = self.lora_b, self.lora_a, 0
        else:  # A split by columns, like W
            sharded, replicated, axis = self.lora_a, self.lora_b, 1
        set_tensor_model_parallel_attributes(sharded, True, axis, 1)
        # Under sequence parallelism the replicated tensor sees only this rank's tokens: its
        # gradient is a partial sum that megatron-core all-reduces for tensors marked so.
        replicated.sequence_parallel = sequence_parallel
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base linear's input ([s, b, in] or its TP/SP shard); returns the output's
        addend, shaped like the base's output."""
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x, self.lora_a)  # [s, b, r]: all of A x (column), or A_i x_i (row)
        if self.mode == "column":
            if self.sequence_parallel:  # x was this rank's tokens; B needs them all
                h = tensor_parallel.gather_from_sequence_parallel_region(h)
            else:  # backward: sum d(A x) over the ranks that each hold a slice of B
                h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
        elif self.sequence_parallel:
            h = tensor_parallel.reduce_scatter_to_sequence_parallel_region(h)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_b) * self.scaling  # [s, b, out(/tp)]


class LoraLinear(torch.nn.Module):
    """`base` (frozen) plus a `LoraAdapter`; called and checkpointed as `base` is.

    The checkpoint keys of `base` stay what they were (no `base.` in them), so a LoRA model
    still reads a converted checkpoint; the adapter's are `<linear>.adapter.lora_a|lora_b`.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        settings: PeftSettings,
        *,
        config,
        init_seed: int,
        gated_rows: bool = False,
    ):
        super().__init__()
        from megatron.core import parallel_state

        self.base = base
        self.mode = parallel_mode(base)
        out_local, in_local = base.weight.shape
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        column = self.mode == "column"
        adapter = LoraAdapter(
            self.mode,
            in_local if column else in_local * tp_size,
            out_local * tp_size if column else out_local,
            settings,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=tp_size,
            dtype=base.weight.dtype,
            device=base.weight.device,
            init_seed=init_seed,
            sequence_parallel=config.sequence_parallel,
        )
        self.add_module(ADAPTER_MODULE, adapter)
        self.config = config
        # A gated MLP's fc1 holds [gate; up] on each TP rank: its B is saved as megatron-core
        # saves that weight, as two halves each sharded on its own, so that the checkpoint's
        # B is [gate rows; up rows] at every TP size.
        self.gated_rows = gated_rows
        self._register_load_state_dict_pre_hook(_base_keys_under_base)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        output, bias = self.base(x, *args, **kwargs)
        addend = getattr(self, ADAPTER_MODULE)(self._normed(x))  # [..., out(/tp)]
        if self._gathers_output(kwargs.get("runtime_gather_output")):
            # A column-parallel base that returns its whole output (the output layer of a
            # model built with parallel_output=False): so must the adapter.
            addend = tensor_parallel.gather_from_tensor_model_parallel_region(addend)
        return output + addend, bias

    def _gathers_output(self, runtime_gather_output: bool | None) -> bool:
        if self.mode != "column":
            return False
        if runtime_gather_output is not None:  # megatron-core's per-call override
            return runtime_gather_output
        return bool(getattr(self.base, "gather_output", False))

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """The input the base's matrix sees: Transformer Engine's LayerNorm+linear layers
        normalise inside (and do not return it), so the norm is applied again here."""
        weight = getattr(self.base, "layer_norm_weight", None)
        if weight is None:
            return x
        if self.config.layernorm_zero_centered_gamma:
            weight = weight + 1
        epsilon = self.config.layernorm_epsilon
        if self.config.normalization == "RMSNorm":
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
            return (normed * weight.float()).to(x.dtype)
        bias = getattr(self.base, "layer_norm_bias", None)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, epsilon)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's entries under the base's own keys (`prefix` + weight, as unwrapped:
        megatron-core's MLP finds linear_fc1.weight by that key), then the adapter's."""
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        adapter = getattr(self, ADAPTER_MODULE)
        axis = {"lora_b": 0} if self.mode == "column" else {"lora_a": 1}
        adapter_state = make_sharded_tensors_for_checkpoint(
            adapter.state_dict(prefix="", keep_vars=True),
            f"{prefix}{ADAPTER_MODULE}.",
            axis,
            sharded_offsets,
        )
        if self.gated_rows:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}{ADAPTER_MODULE}.lora_b"
            adapter_state[key] = apply_swiglu_sharded_factory(adapter_state[key], sharded_offsets)
        state.update(adapter_state)
        return state


def _base_keys_under_base(state_dict, prefix, *args) -> None:
    """Load hook: the base's keys as `sharded_state_dict` names them (`prefix` + weight)
    are this module's `prefix` + base.weight."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith(("base.", f"{ADAPTER_MODULE}.")):
            state_dict[f"{prefix}base.{rest}"] = state_dict.pop(key)
