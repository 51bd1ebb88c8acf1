"""The supervised fine-tuning loss: cross entropy on target tokens only, summed.

The one definition of the loss: the trainer and `megasft evaluate` both call
`masked_token_loss`. The mask is `prepare`'s, unshifted (`loss_mask[i] == 1` iff token `i` is a
target); the shift happens here, once. It returns a sum and a count, for callers to add across
micro-batches and ranks and divide once. See docs/train.md, "What a step computes".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token cross entropies over target tokens, and the number of target tokens.

    Args:
        logits: [b, s, v] scores of the model at every position, any float dtype.
        input_ids: [b, s] token ids of the same rows.
        loss_mask: [b, s] unshifted: `loss_mask[:, i]` marks token `i` as a target. Any dtype;
            nonzero means target. Position 0 can never be a target (nothing predicts it), so
            its value is ignored.

    Returns:
        `(loss_sum, token_count)`: 0-dim fp32 tensors. A batch without targets gives (0, 0),
        never NaN; the caller divides the global sum by the global count.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"shapes do not line up: logits {tuple(logits.shape)}, input_ids "
            f"{tuple(input_ids.shape)}, loss_mask {tuple(loss_mask.shape)}; expected "
            "[b, s, v], [b, s], [b, s]"
        )
    # logits[:, i - 1] predicts input_ids[:, i], which is a target iff loss_mask[:, i].
    predicting = logits[:, :-1].float()  # [b, s-1, v]; fp32 whatever the model ran in
    targets = input_ids[:, 1:]  # [b, s-1]
    weights = (loss_mask[:, 1:] != 0).float()  # [b, s-1]
    token_losses = F.cross_entropy(
        predicting.reshape(-1, predicting.size(-1)), targets.reshape(-1), reduction="none"
    )  # [b * (s-1)]
    # Multiply, not index: the same graph whether or not a row has targets, and 0 * finite = 0.
    loss_sum = (token_losses * weights.reshape(-1)).sum()
    return loss_sum, weights.sum()
