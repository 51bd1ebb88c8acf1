"""A step's optimizer update, with its gradients prepared once.

megatron-core's `optimizer.step()` prepares the gradients (copies them to the fp32 main
weights' gradients under bf16), computes their norm, clips and updates. The trainer must see
the norm before it decides to update (a non-finite step is skipped), so it calls the parts:
`prepared_grad_norm`, then `apply_update` with that norm, as `ChainedOptimizer.step` does.
"""

from __future__ import annotations

from typing import Any

import torch


def prepared_grad_norm(optimizer: Any) -> tuple[float, bool]:
    """Prepare the reduced gradients for the update and return (their total norm, whether
    megatron-core found an Inf/NaN while preparing them, which only fp16 scaling reports)."""
    found_inf = bool(optimizer.prepare_grads())
    return float(optimizer.get_grad_norm()), found_inf


@torch.no_grad()
def apply_update(optimizer: Any, grad_norm: float) -> bool:
    """Clip the prepared gradients to the optimizer's clip_grad by `grad_norm` (their total
    norm over every rank), then update the weights. Returns whether the update was applied.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        parameters = part.get_parameters()
        if getattr(part, "is_stub_optimizer", False) or not parameters:
            continue
        if part.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                parameters,
                max_norm=part.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads())
