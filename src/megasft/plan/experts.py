"""What an MoE layer's router, token dispatcher and experts keep for backward, and allocate.

Counted from megatron-core's `MoELayer` with `HFTopKRouter`, the all-to-all dispatcher and
its experts (`SequentialMLP` on CPU, `TEGroupedMLP` on GPUs, the same tensors), for dropless
routing with every expert receiving its share: `router_topk` copies of each token, spread
evenly over the EP ranks. A skewed router sends some rank more; the load-balancing loss keeps
that in check, and the plan does not add for it. docs/plan.md ("Mixture of experts").
"""

from __future__ import annotations

from megasft.megatron.architecture import ModelArchitecture
from megasft.plan.layout import Layout

ROUTING_BYTES_PER_EXPERT = 22
"""Per token and expert: the router's three fp32 [tokens, experts] tensors (the softmax scores
for routing and for the load-balancing loss, the renormalised probabilities) and the
dispatcher's fp32 transpose of the probabilities and its bool routing map."""
ROUTING_BYTES_PER_CHOICE = 32
"""Per token and chosen expert: int64 indices (top-k's three, the permutation's)."""
ROUTING_BYTES_PER_TOKEN = 5
"""The renormalisation's fp32 sum and a bool padding mark."""
PROBABILITY_BYTES = 4
"""The fp32 routing weight each routed copy of a token carries into its expert."""


def routed_copies(architecture: ModelArchitecture, layout: Layout) -> int:
    """Routed copies of each of this rank's tokens that reach this rank's experts: top-k,
    spread evenly over EP, gathered over ETP (each expert rank works on its ETP group's
    tokens)."""
    return architecture.moe.router_topk * layout.expert_tensor_size


def moe_kept_per_token(architecture: ModelArchitecture, layout: Layout) -> float:
    """Bytes an MoE block keeps for backward per token of this rank (after sequence
    parallelism), beside its norm.

    Args:
        architecture: an MoE model.
        layout: the run's layout (precision, ETP).

    Returns:
        The bytes per token.
    """
    moe, e, h = architecture.moe, layout.element_bytes, architecture.hidden_size
    width = moe.expert_ffn_hidden_size // layout.expert_tensor_size
    routing = (
        ROUTING_BYTES_PER_EXPERT * moe.num_experts
        + ROUTING_BYTES_PER_CHOICE * moe.router_topk
        + ROUTING_BYTES_PER_TOKEN
    )
    # Each routed copy: fc1's output (kept whole by the gate's view), silu(gate), up + 0, their
    # product, the weight and, for the weights' gradients, the expert's input (the permuted
    # tokens) and the product times the weight (fc2's input); PEFT's frozen experts keep
    # neither.
    per_copy = 5 * e * width + PROBABILITY_BYTES
    if layout.peft is None:
        per_copy += e * h + e * width
    return e * h + routing + routed_copies(architecture, layout) * per_copy  # router's input


def moe_working_per_token(architecture: ModelArchitecture, layout: Layout) -> float:
    """Bytes an MoE block allocates beyond what it keeps, per token of this rank, at its
    fullest: in forward, the permuted tokens before and after the dispatcher's all-to-all and
    sort, the experts' outputs on their way back and the restored order; in backward, the same
    tensors' gradients.

    Args:
        architecture: an MoE model.
        layout: the run's layout.

    Returns:
        The bytes per token.
    """
    e, h = layout.element_bytes, architecture.hidden_size
    return 2 * e * h * routed_copies(architecture, layout)
