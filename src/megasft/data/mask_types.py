"""What masking takes and gives: the loss policy, the errors, the masked examples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megasft.errors import ConfigError

LOSS_ON_CHOICES = ("all-assistant", "last-assistant")
OVERLONG_CHOICES = ("drop", "truncate-oldest")


@dataclass(frozen=True)
class MaskPolicy:
    loss_on: str = "all-assistant"
    """Which assistant turns are trained: all of them, or only the last one."""
    train_on_eos: bool = True
    """Whether the end-of-turn token after each trained answer is a target."""

    def __post_init__(self) -> None:
        if self.loss_on not in LOSS_ON_CHOICES:
            raise ConfigError(f"--loss-on must be one of {', '.join(LOSS_ON_CHOICES)}")


class MaskingError(Exception):
    """This conversation cannot be masked; `reason` is a manifest reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Exceptions pickle through `args`, which holds only the message; worker processes send
        # these back inside a MaskedBatch.
        return (MaskingError, (self.reason, self.message))


class TemplateLayoutError(ConfigError):
    """The template cannot be masked at all (a problem with the template, not with a row)."""


@dataclass(frozen=True, slots=True)
class MaskedExample:
    input_ids: np.ndarray
    """[n] int32 token ids of the rendered conversation."""
    loss_mask: np.ndarray
    """[n] int8; loss_mask[i] == 1 iff token i is a training target (unshifted)."""
    boundary_tokens: int
    """Tokens that straddle the edge of a trained span (see the module docstring)."""
    dropped_turns: int = 0
    """Messages removed from the start by `truncate-oldest`."""


@dataclass(frozen=True, slots=True)
class MaskedBatch:
    """The masked examples of many conversations, laid end to end (what `prepare` writes)."""

    input_ids: np.ndarray
    """[tokens] int32; example k is input_ids[offsets[k]:offsets[k + 1]]."""
    loss_mask: np.ndarray
    """[tokens] int8, aligned with input_ids."""
    offsets: np.ndarray
    """[examples + 1] int64."""
    boundary_tokens: np.ndarray
    """[examples] int64, as in MaskedExample."""
    dropped_turns: np.ndarray
    """[examples] int64, as in MaskedExample."""
    outcomes: list[int | MaskingError]
    """One per conversation, in order: the index of its example, or why it was rejected."""

    def example(self, index: int) -> MaskedExample:
        start, end = self.offsets[index], self.offsets[index + 1]
        return MaskedExample(
            self.input_ids[start:end],
            self.loss_mask[start:end],
            int(self.boundary_tokens[index]),
            int(self.dropped_turns[index]),
        )
