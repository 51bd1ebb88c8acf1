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
    """Prepare the reduced gradients for the update (once per step).

    Args:
        optimizer: megatron-core's optimizer, after the step's backward passes.

    Returns:
        (the gradients' total norm over every rank, whether megatron-core found an Inf/NaN
        while preparing them, which only fp16 loss scaling reports).
    """
    found_inf = bool(optimizer.prepare_grads())
    return float(optimizer.get_grad_norm()), found_inf


@torch.no_grad()
def apply_update(optimizer: Any, grad_norm: float) -> bool:
    """Clip the prepared gradients to the optimizer's clip_grad, then update the weights.

    Args:
        optimizer: megatron-core's optimizer, after `prepared_grad_norm`.
        grad_norm: the norm `prepared_grad_norm` returned (clipping scales by it).

    Returns:
        Whether the update was applied.
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
