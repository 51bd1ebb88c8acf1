"""Mixture-of-experts training: the settings a run adds, and what it reports about routing.

`moe_settings` gives the megatron-core `TransformerConfig` fields a run of an MoE model sets
beyond its family's: the load-balancing loss coefficient (`--moe-aux-loss-coeff`, by default
the model's `router_aux_loss_coef`), the token dispatcher, and sequence parallelism whenever
TP > 1 (megatron-core's MoE layer refuses to train with TP but without it). Routing stays
dropless (no expert capacity). `RoutingMetrics` gathers, per step, each MoE layer's
load-balancing loss (from megatron-core's tracker) and the tokens each expert received
(forward hooks on the routers; padding positions are not counted), over all ranks. See docs/train.md ("Mixture of experts").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megasft.megatron.architecture import ModelArchitecture
from megasft.train.checks import RunPlan
from megasft.train.config import TrainConfig
from megasft.train.distributed import Parallel

LOAD_BALANCING_LOSS = "load_balancing_loss"
"""megatron-core's tracker name of the per-layer load-balancing loss (coefficient removed)."""


def moe_settings(config: TrainConfig, architecture: ModelArchitecture) -> dict[str, Any]:
    """The `TransformerConfig` overrides of a run of an MoE model (none for a dense one).

    Args:
        config: the run's settings.
        architecture: the model's architecture.

    Returns:
        The fields by name.
    """
    if architecture.moe is None:
        return {}
    coefficient = config.moe_aux_loss_coeff
    if coefficient is None:
        coefficient = architecture.moe.aux_loss_coeff
    return dict(
        moe_aux_loss_coeff=coefficient,
        moe_token_dispatcher_type=config.moe_token_dispatcher,
        sequence_parallel=config.tensor_parallel > 1,
    )


def routing_metrics(
    plan: RunPlan, parallel: Parallel, model: Sequence[torch.nn.Module]
) -> RoutingMetrics | None:
    """The routing metrics of a run of an MoE model, its routers hooked; None for a dense one.

    Args:
        plan: the checked run.
        parallel: this rank's place in the process grid.
        model: this rank's model chunks, built with `moe_settings`.

    Returns:
        The metrics, or None.
    """
    from megatron.core.utils import get_model_config

    if plan.architecture.moe is None:
        return None
    config = get_model_config(model[0])
    return RoutingMetrics(
        model,
        plan.architecture,
        device=parallel.device,
        counts_tokens=config.sequence_parallel or parallel.tensor_rank == 0,
        data_parallel_size=parallel.data_size,
        aux_loss=config.moe_aux_loss_coeff > 0,
    )


class RoutingMetrics:
    """Per step: each MoE layer's load-balancing loss and tokens per expert, over all ranks."""

    def __init__(
        self,
        model_chunks: Sequence[torch.nn.Module],
        architecture: ModelArchitecture,
        *,
        device: torch.device,
        counts_tokens: bool,
        data_parallel_size: int,
        aux_loss: bool,
    ) -> None:
        """Hook every router of this rank's model chunks.

        Args:
            model_chunks: this rank's model chunks (DDP-wrapped or not).
            architecture: the model's architecture, an MoE one.
            device: where the counters live (the model's device).
            counts_tokens: this rank's routers see tokens that no other rank of its
                tensor-parallel group sees (sequence parallel, or tensor rank 0); without
                sequence parallelism the others route the same tokens again.
            data_parallel_size: megatron-core's data-parallel size (the loss is averaged
                over the data-parallel replicas, as megatron-core logs it).
            aux_loss: the load-balancing loss is on (its coefficient is above 0).
        """
        from megatron.core.transformer.moe.router import TopKRouter

        self.moe_layers = list(architecture.moe.moe_layers)
        self.counts_tokens = counts_tokens
        self.data_parallel_size = data_parallel_size
        self.aux_loss = aux_loss
        # [layer, 0]: the load-balancing loss; [layer, 1 + e]: tokens routed to expert e
        self.totals = torch.zeros(
            architecture.num_layers,
            1 + architecture.moe.num_experts,
            dtype=torch.float64,
            device=device,
        )
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count_tokens)

    def _count_tokens(self, router: torch.nn.Module, inputs: Any, outputs: Any) -> None:
        # Training forwards only: validation runs the routers in eval mode, without grad.
        if router.training and torch.is_grad_enabled() and self.counts_tokens:
            _, routing_map = outputs  # [tokens, experts], True at each token's k experts
            padding_mask = inputs[1] if len(inputs) > 1 else None  # [s, b], True = padding
            if padding_mask is not None:
                routing_map = routing_map[~padding_mask.reshape(-1)]
            self.totals[router.layer_number - 1, 1:] += routing_map.sum(dim=0)

    def step_metrics(self, micro_batches: int) -> dict[str, Any]:
        """The routing metrics of the step just taken; the counters start again. Collective.

        Args:
            micro_batches: micro-batches per step on each data-parallel rank (the tracked loss
                is their sum).

        Returns:
            `moe_expert_tokens` ([MoE layer][expert] token counts of the global batch),
            `moe_load_imbalance` (per MoE layer, the busiest expert's tokens over the mean:
            1 is perfectly balanced) and its largest, `moe_load_imbalance_max`, and with the loss on, `moe_aux_loss` (the per-layer
            load-balancing loss, averaged over micro-batches and MoE layers; 1 when balanced)
            and `moe_aux_loss_per_layer`.
        """
        from megasft.megatron.compat import clear_moe_layer_losses, moe_layer_losses

        tracked = moe_layer_losses(LOAD_BALANCING_LOSS)
        if tracked is not None:  # absent on a pipeline stage without MoE layers
            # Each rank holds its share of its layers' losses: partial sums over its
            # tensor- and context-parallel group, one replica of the data-parallel ones.
            self.totals[:, 0] = tracked.to(self.totals) / self.data_parallel_size
        dist.all_reduce(self.totals)
        totals = self.totals[self.moe_layers].cpu()
        tokens = totals[:, 1:]
        imbalance = tokens.max(dim=-1).values / tokens.mean(dim=-1).clamp(min=1e-12)
        record: dict[str, Any] = {
            "moe_expert_tokens": tokens.long().tolist(),
            "moe_load_imbalance": [round(value, 4) for value in imbalance.tolist()],
            "moe_load_imbalance_max": round(imbalance.max().item(), 4),
        }
        if self.aux_loss:
            losses = totals[:, 0] / micro_batches
            record["moe_aux_loss"] = losses.mean().item()
            record["moe_aux_loss_per_layer"] = [round(value, 6) for value in losses.tolist()]
        if tracked is not None:
            clear_moe_layer_losses()
        self.totals.zero_()
        return record
