"""Core attention on torch alone: packed documents without Transformer Engine.

`TorchDotProductAttention` stands where megatron-core's `DotProductAttention` (or Transformer
Engine's) stands in a layer spec, and computes the same softmax attention with torch's kernels:

- rows ([s, b, heads, d], the CPU layout) with megatron-core's boolean mask (True = masked
  out; `megasft.train.batch.block_causal_mask`): one `scaled_dot_product_attention` call,
  with the attention dropout drawn as megatron-core's `DotProductAttention` draws it;
- packed documents ([t, heads, d] with `cu_seqlens`, the GPU layout): torch's variable-length
  flash attention, else FlexAttention with a document mask, else SDPA per document, whichever
  the installed torch and the device offer (`packed_kernel`).

See docs/train.md ("Attention") for when training uses it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megasft.errors import ConfigError

PACKED_KERNELS = ("varlen", "flex", "sdpa")
"""Kernels for packed documents, fastest first."""
PACKED_KERNEL_ENV = "MEGASFT_PACKED_ATTENTION"
"""Names one of PACKED_KERNELS to use instead of the first available one (for the GPU check)."""


class TorchDotProductAttention(MegatronModule):
    """Causal softmax attention within each document, for one layer of this TP rank's heads.

    Takes the keyword arguments megatron-core's `SelfAttention` passes to its core attention.
    The head counts come from the tensors, so tensor parallelism needs nothing more.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        problems = []
        if config.context_parallel_size > 1:
            problems.append("context parallelism (use --attention te)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            problems.append(f"softmax_type {config.softmax_type}")
        if problems:
            raise ConfigError("the torch attention does not support " + "; ".join(problems))
        # The softmax scale megatron-core's DotProductAttention applies; query-key layer
        # scaling divides and multiplies by the layer number, which cancels out here.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.window = _layer_window(config, layer_number)
        """Keys at distance 0 .. window from the query are seen (None: all earlier ones)."""
        self.dropout = float(dropout or 0.0)
        """The attention dropout, on rows only (`packed_attention` has none)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Returns [s, b, heads * d] for rows, [t, heads * d] for packed documents."""
        if attention_bias is not None:
            raise ConfigError("the torch attention does not support an attention bias")
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if dropout:
                raise ConfigError(
                    "the torch attention has no attention dropout on packed documents; use "
                    "--attention te, or --attention-dropout 0"
                )
            return packed_attention(
                query, key, value, packed_seq_params, self.softmax_scale, self.window
            )
        if not dropout:
            return rows_attention(
                query, key, value, attention_mask, self.softmax_scale, self.window
            )
        # As megatron-core's DotProductAttention: each tensor-parallel rank draws its heads'
        # masks from the model-parallel stream; under sequence parallelism from the default one.
        from megatron.core import tensor_parallel

        fork = contextlib.nullcontext()
        if not self.config.sequence_parallel:
            fork = tensor_parallel.get_cuda_rng_tracker().fork()
        with fork:
            return rows_attention(
                query, key, value, attention_mask, self.softmax_scale, self.window, dropout
            )


def _layer_window(config: TransformerConfig, layer_number: int) -> int | None:
    """The sliding window of this layer (megatron-core's `window_size` is (left, 0))."""
    if config.window_size is None:
        return None
    from megatron.core.transformer.utils import is_layer_window_attention

    if not is_layer_window_attention(
        config.window_size, config.window_attn_skip_freq, layer_number
    ):
        return None
    left, right = config.window_size
    if right != 0:
        raise ConfigError(f"the torch attention needs a causal window, got {config.window_size}")
    return int(left)


def _allowed(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None):
    """[q, k] bool: causal, and within the window when there is one."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance <= window
    return allowed


def rows_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    window: int | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention over rows, one SDPA call.

    Args:
        query: [s, b, heads, d].
        key, value: [s, b, groups, d]; each group serves heads / groups query heads.
        attention_mask: [b, 1, s, s] bool, True = masked out (megatron-core's convention), or
            None for plain causal attention.
        scale: the softmax scale.
        window: keys at most this far before the query are seen (None: all).
        dropout: the probability of dropping an attention weight (drawn from the default
            generator).

    Returns:
        [s, b, heads * d].
    """
    seq_len, batch, heads, head_dim = query.shape
    # [s, b, n, d] -> [b, n, s, d], the layout SDPA takes
    query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))
    key, value = _repeat_groups(key, value, heads, dim=1)
    mask = None
    if attention_mask is not None:
        mask = ~attention_mask  # SDPA's True means "attend"
    if window is not None:
        positions = torch.arange(seq_len, device=query.device)
        windowed = _allowed(positions, positions, window)
        mask = windowed if mask is None else mask & windowed
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale, dropout_p=dropout
    )  # [b, n, s, d]
    return output.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * head_dim)


def _repeat_groups(key: torch.Tensor, value: torch.Tensor, heads: int, dim: int):
    """Key and value with each query group's head repeated for the query heads it serves."""
    repeats = heads // key.size(dim)
    if repeats == 1:
        return key, value
    return key.repeat_interleave(repeats, dim=dim), value.repeat_interleave(repeats, dim=dim)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: PackedSeqParams,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Causal attention within each of the documents packed into one sequence.

    Args:
        query: [t, heads, d].
        key, value: [t, groups, d].
        params: `cu_seqlens_q` delimits the documents (and padding segments).
        scale: the softmax scale.
        window: keys at most this far before the query are seen (None: all).

    Returns:
        [t, heads * d].

    Raises:
        ConfigError: a kernel forced by MEGASFT_PACKED_ATTENTION that cannot run here.
    """
    total, heads, head_dim = query.shape
    kernel = packed_kernel(query, window)
    if kernel == "varlen":
        output = _varlen(query, key, value, params, scale, window)
    elif kernel == "flex":
        output = _flex(query, key, value, params, scale, window)
    else:
        output = _sdpa_per_document(query, key, value, params, scale, window)
    return output.reshape(total, heads * head_dim)


def packed_kernel(query: torch.Tensor, window: int | None = None) -> str:
    """The kernel packed documents use for `query`'s device and dtype (see PACKED_KERNELS).

    `varlen` needs torch's `varlen_attn` (torch >= 2.9; with a sliding window, one that takes
    `window_size`), an NVIDIA GPU and bf16/fp16; `flex` needs FlexAttention and a GPU (on
    ROCm it comes first: its Triton kernels are the better-trodden path there); `sdpa` (one
    call per document) runs anywhere.

    Args:
        query: the queries (only their device and dtype are read).
        window: the layer's sliding window, if any.

    Returns:
        One of PACKED_KERNELS.

    Raises:
        ConfigError: MEGASFT_PACKED_ATTENTION names no kernel.
    """
    chosen = os.environ.get(PACKED_KERNEL_ENV)
    if chosen:
        if chosen not in PACKED_KERNELS:
            raise ConfigError(
                f"{PACKED_KERNEL_ENV}={chosen}: choose one of {', '.join(PACKED_KERNELS)}"
            )
        return chosen
    if query.device.type != "cuda":
        return "sdpa"
    varlen = query.dtype in (torch.bfloat16, torch.float16) and _varlen_keywords(window)
    if varlen and not torch.version.hip:
        return "varlen"
    if _flex_function() is not None:
        return "flex"
    return "varlen" if varlen else "sdpa"


@functools.cache
def _varlen_function():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    import inspect

    function = _varlen_function()
    return frozenset(inspect.signature(function).parameters) if function else frozenset()


def _varlen_keywords(window: int | None) -> dict | None:
    """The installed `varlen_attn`'s keywords for causal attention within `window`, or None
    where it has no such form (its first releases took `is_causal` and no window)."""
    parameters = _varlen_parameters()
    if "window_size" in parameters:
        keywords: dict[str, Any] = {"window_size": (-1 if window is None else window, 0)}
    elif "is_causal" in parameters and window is None:
        keywords = {"is_causal": True}
    else:
        return None
    if "enable_gqa" in parameters:
        keywords["enable_gqa"] = True
    return keywords


@functools.cache
def _flex_function():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    # Uncompiled, FlexAttention materialises every score; compiled once per shape.
    return torch.compile(flex_attention, dynamic=False)


def _varlen(query, key, value, params: PackedSeqParams, scale, window):
    keywords = _varlen_keywords(window)
    if keywords is None:
        raise ConfigError(
            f"{PACKED_KERNEL_ENV}=varlen: this torch's varlen_attn cannot do causal attention"
            f"{' within a window' if window is not None else ''}; choose flex or sdpa"
        )
    if not keywords.get("enable_gqa"):
        key, value = _repeat_groups(key, value, query.size(1), dim=1)
    cu_seqlens = params.cu_seqlens_q.to(torch.int32)
    max_length = int(params.max_seqlen_q)
    # the flash kernels want the head dimension contiguous
    query, key, value = (tensor.contiguous() for tensor in (query, key, value))
    return _varlen_function()(
        query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, scale=scale, **keywords
    )


_block_masks: dict[str, Any] = {"params": None, "by_window": {}}
"""The block masks of the micro-batch whose PackedSeqParams is "params", by window: built once
and shared by its layers. Holding that object keeps its identity from being reused."""


def _flex(query, key, value, params: PackedSeqParams, scale, window):
    from torch.nn.attention.flex_attention import create_block_mask

    total = query.size(0)
    cu_seqlens = params.cu_seqlens_q
    if _block_masks["params"] is not params:
        _block_masks.update(params=params, by_window={})
    block_mask = _block_masks["by_window"].get(window)
    if block_mask is None:
        positions = torch.arange(total, device=query.device)
        # document[i]: the index of the document token i belongs to
        document = torch.searchsorted(cu_seqlens[1:].to(positions), positions, right=True)

        def document_causal(batch, head, query_index, key_index):
            # no in-place operators: the compiled kernel evaluates this per block of scores
            allowed = (document[query_index] == document[key_index]) & (query_index >= key_index)
            if window is not None:
                allowed = allowed & (query_index - key_index <= window)
            return allowed

        block_mask = create_block_mask(
            document_causal, None, None, total, total, device=query.device
        )
        _block_masks["by_window"][window] = block_mask
    # [t, n, d] -> [1, n, t, d]
    query, key, value = (tensor.transpose(0, 1)[None] for tensor in (query, key, value))
    output = _flex_function()(
        query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True
    )  # [1, n, t, d]
    return output[0].transpose(0, 1)


def _sdpa_per_document(query, key, value, params: PackedSeqParams, scale, window):
    key, value = _repeat_groups(key, value, query.size(1), dim=1)
    boundaries = params.cu_seqlens_q.tolist()
    outputs = []
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        if end == start:
            continue
        # [n, d] per token -> [1, n, length, d]
        q, k, v = (tensor[start:end].transpose(0, 1)[None] for tensor in (query, key, value))
        mask = None
        if window is not None:
            positions = torch.arange(end - start, device=query.device)
            mask = _allowed(positions, positions, window)
        outputs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale
            )[0].transpose(0, 1)
        )
    return torch.cat(outputs)
