"""The router of megasft's MoE layers: top-k routing exactly as transformers does it.

transformers (Mixtral, Qwen3-MoE) takes the softmax of the router logits over all experts in
fp32, selects the k largest of those probabilities with `torch.topk`, and, when the model says
so (`norm_topk_prob`; Mixtral always), divides the k weights by their sum. megatron-core's
`TopKRouter` with `moe_router_pre_softmax=True` does the first two steps, in that order, on the
same fp32 probabilities, so the same experts win, ties included; it never renormalises.
(`moe_router_pre_softmax=False` renormalises, as a softmax over the k largest logits, but
selects on the logits, which can split a tie that the probabilities have.) `HFTopKRouter` is
the first plus the renormalisation. See docs/convert.md ("Mixture of experts").

It also weighs the load-balancing loss by the tokens it covers itself, the same way in every
megatron-core version and layout: see `HFTopKRouter.attach_and_log_load_balancing_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

if not hasattr(moe_utils, "te_general_gemm"):
    # megatron-core 0.16.1 imports `te_general_gemm` from Transformer Engine when TE is there,
    # defines nothing when it is not, and then tests `te_general_gemm is not None` in the
    # router's linear layer: a NameError on every forward without TE. None is what that test
    # expects, and selects the plain `torch.mm` path.
    moe_utils.te_general_gemm = None


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gradient * ctx.factor, None


class HFTopKRouter(TopKRouter):
    """megatron-core's softmax-then-top-k router, with transformers' renormalisation.

    Build it through `functools.partial(HFTopKRouter, normalize_topk=...)` as the `router` of
    megatron-core's `MoESubmodules`; the config must set `moe_router_pre_softmax=True` and
    `moe_router_score_function="softmax"`.
    """

    def __init__(self, *args, normalize_topk: bool, **kwargs) -> None:
        """Args:
        normalize_topk: divide each token's k routing weights by their sum.
        *args, **kwargs: `TopKRouter`'s (config, pg_collection).
        """
        super().__init__(*args, **kwargs)
        if not self.config.moe_router_pre_softmax or self.score_function != "softmax":
            raise ValueError("HFTopKRouter needs moe_router_pre_softmax and a softmax score")
        self.normalize_topk = normalize_topk
        # The per-token weighting of the load-balancing loss is done here, not by
        # megatron-core (see attach_and_log_load_balancing_loss).
        self.weigh_by_tokens = self.calculate_per_token_loss
        self.calculate_per_token_loss = False
        self.group_tokens: torch.Tensor | None = None

    def routing(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing (and the load-balancing loss, when on) as `TopKRouter.routing`, then
        the renormalisation.

        Args:
            logits: [s, b, experts] router logits.
            padding_mask: [s, b], True at padding positions (left out of the loss), or None.

        Returns:
            (probs [tokens, experts], zero outside each token's k experts; routing_map, the
            same shape, True at the k experts).
        """
        if self.weigh_by_tokens and self.training and torch.is_grad_enabled():
            self.group_tokens = self._group_token_count(logits, padding_mask)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.normalize_topk:
            # Summed as transformers sums them: its [tokens, k] top values, in topk's order.
            # (A sum over the [tokens, experts] row, zeros included, may add in another order.)
            total = probs.topk(self.topk, dim=-1).values.sum(dim=-1, keepdim=True)
            probs = probs / total
        return probs, routing_map

    def _group_token_count(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The tokens (padding left out) that this rank's TP x CP group routes together."""
        if padding_mask is None:
            count = torch.tensor(float(logits.shape[0] * logits.shape[1]), device=logits.device)
        else:
            count = (~padding_mask).sum().to(torch.float32)
        if self.tp_cp_group.size() > 1 and self.is_aux_loss_enabled():
            torch.distributed.all_reduce(count, group=self.tp_cp_group)
        return count

    def attach_and_log_load_balancing_loss(
        self,
        activation: torch.Tensor,
        aux_loss_coeff: float,
        aux_loss: torch.Tensor,
        aux_loss_name: str,
        reduce_group: torch.distributed.ProcessGroup,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """`TopKRouter`'s, the loss's gradient weighted by the tokens it covers.

        megasft's trainer divides the gradients by the target tokens of the global batch
        (`calculate_per_token_loss`), so a loss over N tokens must weigh N. Each rank of a
        TP x CP group computes its share of the loss over the group's tokens, so N is the
        group's count (padding left out). megatron-core does this weighting itself, but
        0.16.1 counts this rank's tokens only (1/(TP x CP) of the gradient under sequence
        parallelism) and 0.19.2 multiplies by TP x CP a count that, given a padding mask, is
        already the group's (its all-reduce of the counts is in place): so it is off here and
        done on the gradient instead, the logged loss unchanged. Tested: TP=2 equals TP=1.

        Args:
            See `TopKRouter.attach_and_log_load_balancing_loss` (whose further arguments
            differ between versions and are passed on).

        Returns:
            `activation`, with the loss attached to its backward pass.
        """
        if self.weigh_by_tokens and reduce_group is self.tp_cp_group:
            aux_loss = _ScaleGradient.apply(aux_loss, self.group_tokens)
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group, *args, **kwargs
        )
