"""Activation memory of one pipeline stage, after Korthikanti et al. 2022.

"Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198) counts,
operator by operator, what a transformer layer keeps for backward: 34sbh + 5as^2b bytes per
GPT layer in 16 bits (eq. 1), /t with tensor and sequence parallelism (eq. 4), 2sbh with full
recomputation, and L layers' worth on the first pipeline stage. `layer_bytes` redoes that
count for megasft's layers (RMSNorm, grouped queries, a gated MLP, flash attention on GPUs,
SDPA on CPU) as megatron-core builds them; `stage_activations` adds the pipeline's micro-batches in
flight and what backward allocates on top. docs/plan.md lists every term and the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.peft import method_named
from megasft.plan.experts import moe_kept_per_token, moe_working_per_token
from megasft.plan.layout import Layout, sequence_parallel
from megasft.plan.parameters import OUTPUT_TARGET, chunk_layers

STATISTICS_BYTES = 4
"""Norm statistics, softmax statistics and the cross entropy's softmax are fp32."""


@dataclass(frozen=True)
class Activations:
    """Bytes of one pipeline stage's activations at its peak."""

    stored: int
    """Kept for backward by every micro-batch in flight."""
    transient: int
    """Allocated on top while backward runs: logits' gradients, a recomputed layer, ..."""
    in_flight: int
    """Micro-batches (model chunks' worth, with virtual stages) whose activations are kept."""


@dataclass(frozen=True)
class _Sizes:
    """The symbols of the formulas, for one rank and one micro-batch."""

    e: int  # bytes per 16-bit (or fp32) element
    t: int  # tensor-parallel size
    sp: int  # t with sequence parallelism, else 1: the norms' and residuals' split
    s: int  # sequence length on this context-parallel rank
    tokens: int  # s x micro-batch
    mask: int  # bytes per dropout-mask element: bool in fused kernels, a float mask on CPU

    @classmethod
    def of(cls, architecture: ModelArchitecture, layout: Layout) -> _Sizes:
        s = layout.seq_length // layout.context_parallel
        e = layout.element_bytes
        t = layout.tensor_parallel
        return cls(
            e=e,
            t=t,
            sp=t if sequence_parallel(architecture, layout) else 1,
            s=s,
            tokens=s * layout.micro_batch_size,
            mask=1 if layout.transformer_engine else e,
        )


def layer_bytes(
    architecture: ModelArchitecture, layout: Layout, recompute: str, moe: bool = False
) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch.

    Args:
        architecture: the model.
        layout: parallel sizes, micro-batch, sequence, precision, layer spec, dropout.
        recompute: "none", "selective" or "full" for this layer.
        moe: the layer has the MoE block instead of the dense MLP.

    Returns:
        The bytes on one rank.
    """
    a, z = architecture, _Sizes.of(architecture, layout)
    e, t, sp = z.e, z.t, z.sp
    h, d, f = a.hidden_size, a.head_dim, a.ffn_hidden_size
    heads, groups = a.num_attention_heads / t, a.num_query_groups / t
    if recompute == "full":
        return z.tokens * e * h / sp  # the layer's input; the rest is recomputed
    per_token = 0.0
    if layout.transformer_engine:
        # Fused norm + linear (Transformer Engine): the input and 1/rms (its normalised
        # output is the linear's input, below).
        per_token += 2 * (e * h / sp + STATISTICS_BYTES / sp)
    else:
        # megatron-core's local RMSNorm (torch): the input in fp32, the normalised input in
        # fp32 (for the weight's gradient: not when PEFT freezes it) and 1/rms (its output
        # is the linear's input, below).
        per_token += 2 * (_norm_copies(layout) * STATISTICS_BYTES * h / sp)
        per_token += 2 * STATISTICS_BYTES / sp
    if a.qk_layernorm:
        per_token += _qk_norm_bytes(layout, heads, groups, d)
    if recompute == "selective":
        # The core-attention checkpoint keeps q and k after RoPE, and v, a view that keeps
        # the whole fused QKV output (unless the key norm keeps it already).
        fused_kept = a.qk_layernorm and (layout.transformer_engine or e == STATISTICS_BYTES)
        per_token += e * (heads + groups) * d + (0 if fused_kept else e * (heads + 2 * groups) * d)
    elif layout.transformer_engine:
        # Flash attention keeps q, k, v, its output and the softmax statistics; dropout is
        # drawn inside.
        per_token += e * (heads + 2 * groups) * d + e * heads * d + STATISTICS_BYTES * heads
    elif layout.attention_dropout > 0:
        # The torch attention (SDPA) with dropout takes torch's math kernel, in fp32: q, and
        # k and v repeated to every query head, the softmax, its dropout mask and the dropped
        # weights.
        per_token += STATISTICS_BYTES * (3 * heads * d + 3 * heads * z.s)
    else:
        # The torch attention (SDPA's flash kernel on CPU): q, and k and v repeated to every
        # query head, its output (the projection's input), the log-sum-exp, and the document
        # mask as floats (made per layer).
        per_token += 4 * e * heads * d + STATISTICS_BYTES * heads + e * z.s
    if moe:
        per_token += moe_kept_per_token(a, layout) / sp
        per_token += _linear_input_bytes(a, layout, ("linear_qkv", "linear_proj"), recompute)
    else:
        # The gated MLP: fc1's output (kept whole by the gate's view), silu(gate) and up + 0
        # (a new tensor in megatron-core's glu); their product is fc2's input.
        per_token += 4 * e * f / t
        per_token += _linear_input_bytes(a, layout, tuple(LINEAR_INPUTS), recompute)
    if layout.hidden_dropout > 0:
        per_token += 2 * z.mask * h / sp  # after attention and after the MLP
    total = z.tokens * per_token
    if not layout.transformer_engine:
        total += 4 * e * z.s * d  # RoPE's cos and sin for q and k, made per layer
    return total


def _norm_copies(layout: Layout) -> int:
    """fp32 copies of its input a local (torch) RMSNorm keeps: the input, and the normalised
    input for the weight's gradient, which a frozen weight (PEFT) does not need."""
    return 1 if layout.peft is not None else 2


LINEAR_INPUTS = {
    "linear_qkv": lambda a, t, sp: a.hidden_size / sp,
    "linear_proj": lambda a, t, sp: a.num_attention_heads * a.head_dim / t,
    "linear_fc1": lambda a, t, sp: a.hidden_size / sp,
    "linear_fc2": lambda a, t, sp: a.ffn_hidden_size / t,
}
"""The input width of each megatron-core linear of a layer, per token on one rank."""
FUSED_NORMS = ("linear_qkv", "linear_fc1")
"""Transformer Engine's linears that normalise their input inside."""


def _linear_input_bytes(
    architecture: ModelArchitecture, layout: Layout, linears: tuple[str, ...], recompute: str
) -> float:
    """Per token: the input each linear keeps for its weight's gradient, or under PEFT what
    the adapters keep (a frozen linear keeps nothing: megatron-core's frozen-weight linear
    needs only its weight). Flash attention keeps its output, the projection's input, anyway
    (but under selective recompute).
    Over a Transformer Engine linear that normalises inside, an adapter normalises again
    (megasft.megatron.peft.lora_layers), keeping the input in fp32 and 1/rms."""
    z, peft = _Sizes.of(architecture, layout), layout.peft
    method = method_named(peft.method) if peft is not None else None
    # the attention's output, unless its checkpoint (selective recompute) dropped it
    output_kept = recompute != "selective" and _attention_keeps_output(layout)
    kept_elsewhere = ("linear_proj",) if output_kept else ()
    total = 0.0
    for linear in linears:
        inputs = LINEAR_INPUTS[linear](architecture, z.t, z.sp)
        targeted = peft is not None and linear in peft.targets
        besides, keeps_input = (0.0, False)
        if targeted:
            besides, keeps_input = method.adapter_kept(peft, inputs=inputs)
        if (peft is None or keeps_input) and linear not in kept_elsewhere:
            total += z.e * inputs
        total += z.e * besides
        if targeted and layout.transformer_engine and linear in FUSED_NORMS:
            total += STATISTICS_BYTES * (inputs + 1 / z.sp)
    return total


def _attention_keeps_output(layout: Layout) -> bool:
    """Flash attention (Transformer Engine's, SDPA's) keeps its output, the projection's
    input; SDPA's math kernel (with dropout, on CPU) does not."""
    return layout.transformer_engine or layout.attention_dropout == 0


def _qk_norm_bytes(layout: Layout, heads: float, groups: float, d: int) -> float:
    """Per token: what the RMSNorms over each query and key head keep (Qwen3). Their key
    input is a view of the fused QKV output, which it keeps whole where it is saved as is."""
    e, fused = layout.element_bytes, (heads + 2 * groups) * d
    statistics = STATISTICS_BYTES * (heads + groups)
    if layout.transformer_engine:  # Transformer Engine's norm keeps its input and 1/rms
        return e * heads * d + e * fused + statistics
    # megatron-core's local norm: the input in fp32 (the fused output itself when fp32) and,
    # unless PEFT froze the norms, the normalised input in fp32, per head
    key_input = STATISTICS_BYTES * (fused if e == STATISTICS_BYTES else groups * d)
    normalised = (_norm_copies(layout) - 1) * STATISTICS_BYTES * (heads + groups) * d
    return STATISTICS_BYTES * heads * d + key_input + normalised + statistics


def layer_working_bytes(
    architecture: ModelArchitecture, layout: Layout, moe: bool = False
) -> float:
    """Bytes a layer allocates beyond what it keeps while its forward or backward runs, for
    one micro-batch (the MLP's own tensors freed by then are subtracted).

    Args:
        architecture: the model.
        layout: the run's layout.
        moe: the layer has the MoE block instead of the dense MLP.

    Returns:
        The bytes on one rank.
    """
    a, z = architecture, _Sizes.of(architecture, layout)
    heads, groups = a.num_attention_heads / z.t, a.num_query_groups / z.t
    if moe:
        mlp_kept = moe_kept_per_token(a, layout) / z.sp
        mlp_working = moe_working_per_token(a, layout) / z.sp
    else:
        # the MLP's gradients (fc1's output and the gate's)
        mlp_kept, mlp_working = 5 * z.e * a.ffn_hidden_size / z.t, 2 * z.e * a.ffn_hidden_size / z.t
    if layout.transformer_engine or layout.attention_dropout == 0:
        # the MLP's, or flash attention's gradients of q, k and v (k and v repeated to every
        # query head on CPU) with its fp32 accumulator for q
        kv = groups if layout.transformer_engine else heads
        attention = z.e * (heads + 2 * kv) * a.head_dim + STATISTICS_BYTES * heads * a.head_dim
        return z.tokens * max(mlp_working, attention)
    # SDPA's math kernel: the fp32 scores in forward, or the dropped weights' and the
    # softmax's gradients in backward, while the MLP's tensors of this layer are gone
    attention = 2 * STATISTICS_BYTES * heads * z.s - mlp_kept
    return z.tokens * max(0.0, attention, mlp_working)


def in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations a pipeline stage keeps at its peak (chunk-micro-batches
    with virtual stages): 1F1B's warm-up plus one, as megatron-core schedules them."""
    p, v, m = layout.pipeline_parallel, layout.virtual_pipeline_stages, layout.micro_batches
    if p == 1:
        return 1
    if v == 1:
        return min(p - stage, m)
    return min((p - stage - 1) * 2 + (v - 1) * p + 1, m * v)


def stage_activations(architecture: ModelArchitecture, layout: Layout, stage: int) -> Activations:
    """The activations of one pipeline stage at its peak.

    The stored part is every in-flight micro-batch's layers (and the embedding's or output
    layer's tensors on the first or last stage). The transient part is the largest of what
    one micro-batch's backward adds on top at any moment: the logits' gradients (last stage),
    a layer's working memory, or the first recomputed layer re-run once the layers above it
    were freed.

    Args:
        architecture: the model.
        layout: the run's layout.
        stage: the pipeline rank.

    Returns:
        Stored and transient bytes, and the micro-batches in flight.
    """
    a, z = architecture, _Sizes.of(architecture, layout)
    h, sp = a.hidden_size, z.sp
    first, last = stage == 0, stage == layout.pipeline_parallel - 1
    count = in_flight(layout, stage)
    # chunk-specific parts (embedding, output) are in flight once per round of chunks
    own_chunk = math.ceil(count / layout.virtual_pipeline_stages)
    mode = "none" if layout.recompute == "full" else layout.recompute
    chunks = [
        [a.is_moe_layer(layer) for layer in chunk_layers(a, layout, stage, chunk)]
        for chunk in range(layout.virtual_pipeline_stages)
    ]
    layers = len(chunks[0])
    recomputed = 0
    if layout.recompute == "full":
        recomputed = min(layers, layout.recompute_layers or layers)
    # the chunk that keeps the most (the stage's only one without virtual stages)
    per_micro_batch, moe_layers = max(
        (
            recomputed * layer_bytes(a, layout, "full")
            + sum(layer_bytes(a, layout, mode, moe) for moe in chunk[recomputed:]),
            chunk,
        )
        for chunk in chunks
    )
    stored = count * per_micro_batch
    if first and layout.peft is not None:
        # the frozen embedding's output needs no gradient: the first norm keeps nothing
        first_norm = (
            _norm_copies(layout) * STATISTICS_BYTES if not layout.transformer_engine else z.e
        )
        stored -= own_chunk * z.tokens * (first_norm * h / sp + STATISTICS_BYTES / sp)
    if first and layout.hidden_dropout > 0:
        stored += own_chunk * z.tokens * z.mask * h / sp  # the embedding's dropout mask
    if not last and not layout.deallocate_pipeline_outputs:
        stored += count * z.tokens * z.e * h / sp  # outputs kept after sending
    working = max(layer_working_bytes(a, layout, moe) for moe in moe_layers[recomputed:] or [0])
    if mode == "selective":  # core attention re-run in backward, then its backward
        working += max(0.0, layer_bytes(a, layout, "none") - layer_bytes(a, layout, "selective"))
    phases = [working if layers > recomputed else 0.0]
    head = 0.0  # what the last stage keeps after the layers, per micro-batch
    if last:
        vocab = a.padded_vocab_size / z.t
        if layout.transformer_engine:
            final_norm = z.e * h / sp + STATISTICS_BYTES / sp
        else:
            final_norm = _norm_copies(layout) * STATISTICS_BYTES * h + STATISTICS_BYTES
        # final norm, the output layer's input, the cross entropy's fp32 softmax
        head = z.tokens * (final_norm + z.e * h / sp + STATISTICS_BYTES * vocab)
        if layout.peft is not None and OUTPUT_TARGET in layout.peft.targets:
            # the output layer's adapter: A x (or with dropout the dropped input and its
            # mask); its input x is the output layer's, counted above
            besides, _ = method_named(layout.peft.method).adapter_kept(layout.peft, inputs=h / sp)
            head += z.tokens * z.e * besides
        stored += own_chunk * head
        # backward: the logits' gradient cast to 16 bits, with padding columns masked, and
        # transposed back ([b, s] -> [s, b]), on top of the softmax that became the gradient
        phases.append(z.tokens * vocab * (3 * z.e if z.e < STATISTICS_BYTES else 2 * z.e))
    if recomputed:
        # the top recomputed layer is re-run once every layer above it (and the last stage's
        # head) was freed
        top = moe_layers[recomputed - 1]
        rerun = (
            layer_bytes(a, layout, "none", top)
            - layer_bytes(a, layout, "full")
            + layer_working_bytes(a, layout, top)
        )
        above = sum(layer_bytes(a, layout, mode, moe) for moe in moe_layers[recomputed:])
        phases.append(max(0.0, rerun - above - head))
    transient = max(phases)
    if not layout.transformer_engine and layout.peft is None:
        # without gradient-accumulation fusion a weight's gradient is made, then added to
        # the fp32 buffer: the largest weight of the stage (the output layer, or fc1)
        fc1 = 2 * a.ffn_hidden_size / z.t
        if all(moe_layers):  # no dense MLP: an expert's
            fc1 = 2 * a.moe.expert_ffn_hidden_size / layout.expert_tensor_size
        transient += z.e * max(a.padded_vocab_size / z.t, fc1) * h
    return Activations(stored=int(stored), transient=int(transient), in_flight=count)
