"""The router of megasft's MoE layers: top-k routing exactly as transformers does it.

transformers (Mixtral, Qwen3-MoE) takes the softmax of the router logits over all experts in
fp32, selects the k largest of those probabilities with `torch.topk`, and, when the model says
so (`norm_topk_prob`; Mixtral always), divides the k weights by their sum. megatron-core's
`TopKRouter` with `moe_router_pre_softmax=True` does the first two steps, in that order, on the
same fp32 probabilities, so the same experts win, ties included; it never renormalises.
(`moe_router_pre_softmax=False` renormalises, as a softmax over the k largest logits, but
selects on the logits, which can split a tie that the probabilities have.) `HFTopKRouter` is
the first plus the renormalisation. See docs/convert.md ("Mixture of experts").

It also corrects the scale of the load-balancing loss under sequence (or context)
parallelism: see `HFTopKRouter.attach_and_log_load_balancing_loss` and docs/train.md.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

if not hasattr(moe_utils, "te_general_gemm"):
    # megatron-core 0.16.1 imports `te_general_gemm` from Transformer Engine when TE is there,
    # defines nothing when it is not, and then tests `te_general_gemm is not None` in the
    # router's linear layer: a NameError on every forward without TE. None is what that test
    # expects, and selects the plain `torch.mm` path.
    moe_utils.te_general_gemm = None


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

    def routing(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing (and the load-balancing loss, when on) as `TopKRouter.routing`, then
        the renormalisation.

        Args:
            logits: [s, b, experts] router logits.
            padding_mask: as `TopKRouter.routing`.

        Returns:
            (probs [tokens, experts], zero outside each token's k experts; routing_map, the
            same shape, True at the k experts).
        """
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.normalize_topk:
            # Summed as transformers sums them: its [tokens, k] top values, in topk's order.
            # (A sum over the [tokens, experts] row, zeros included, may add in another order.)
            total = probs.topk(self.topk, dim=-1).values.sum(dim=-1, keepdim=True)
            probs = probs / total
        return probs, routing_map

    def attach_and_log_load_balancing_loss(
        self,
        activation: torch.Tensor,
        aux_loss_coeff: float,
        aux_loss: torch.Tensor,
        aux_loss_name: str,
        reduce_group: torch.distributed.ProcessGroup,
        reduce_group_has_dp: bool = False,
        valid_token_count: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`TopKRouter`'s, with the tokens of the whole reduce group counted.

        With `calculate_per_token_loss` (megasft's trainer), megatron-core multiplies the
        loss by the tokens it was computed on, because the gradients are later divided by
        the target tokens of the global batch. Under sequence or context parallelism each
        rank of the reduce group (TP x CP) computes its share of the loss of all the group's
        tokens, so the multiplier must be the group's token count. megatron-core 0.16 passes
        that count when given a padding mask (the trainer always gives one: its all-reduce of
        the token counts happens in place, so its "local" count is the group's), but this
        rank's count, an int, without one: the load-balancing gradient would then be
        1/(TP x CP) of what the same batch gives at TP = CP = 1. That case is scaled here.

        Args:
            See `TopKRouter.attach_and_log_load_balancing_loss`.

        Returns:
            `activation`, with the loss attached to its backward pass.
        """
        if isinstance(valid_token_count, int) and not reduce_group_has_dp:
            # Without padding the ranks' shares of the sequence are equal.
            valid_token_count = valid_token_count * reduce_group.size()
        return super().attach_and_log_load_balancing_loss(
            activation,
            aux_loss_coeff,
            aux_loss,
            aux_loss_name,
            reduce_group,
            reduce_group_has_dp=reduce_group_has_dp,
            valid_token_count=valid_token_count,
        )
