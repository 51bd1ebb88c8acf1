"""Load the weights of a converted (or trained) checkpoint into a model at any TP/PP.

The model's `sharded_state_dict()` says which slice of every global tensor this rank holds;
megatron-core's `dist_checkpointing.load` reads exactly those slices. Only weights are loaded:
`_extra_state` entries (Transformer Engine's FP8 scaling state, empty for the local layers)
are skipped, so a checkpoint written with one layer spec loads into a model of the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megasft.constants import ARCHITECTURE_FILE
from megasft.errors import ConfigError
from megasft.megatron.compat import check_checkpoint_readable

_EXTRA_STATE = "_extra_state"


def load_weights(
    model: torch.nn.Module | Sequence[torch.nn.Module], checkpoint_dir: str | os.PathLike
) -> None:
    """Load this rank's slice of every weight of `model` from a megatron checkpoint.

    Collective: call on every rank. With virtual pipeline stages the chunks of all ranks
    together cover the layers, so they are read in one `dist_checkpointing.load` call (each
    chunk alone leaves layers uncovered, which megatron-core's validation refuses).

    Args:
        model: a `GPTModel` of any TP/PP stage, or this rank's model chunks; each may be
            wrapped in megatron-core's `DistributedDataParallel`.
        checkpoint_dir: a megasft megatron checkpoint (converted or trained).

    Raises:
        ConfigError: the checkpoint's tensors do not fit the model, or the installed
            megatron-core cannot read its format (`compat.check_checkpoint_readable`).
    """
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    # The DDP wrapper's keys carry a `module.` prefix that the checkpoint's do not.
    chunks = [getattr(chunk, "module", chunk) for chunk in chunks]
    sharded_state_dict = {
        f"model{index}": {
            name: value
            for name, value in chunk.sharded_state_dict().items()
            if not (isinstance(value, ShardedObject) or name.endswith(_EXTRA_STATE))
        }
        for index, chunk in enumerate(chunks)
    }
    check_checkpoint_readable(checkpoint_dir)
    state_dict = dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir))
    for index, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(state_dict[f"model{index}"], strict=False)
        missing = [name for name in missing if not name.endswith(_EXTRA_STATE)]
        if missing or unexpected:
            raise ConfigError(
                f"{checkpoint_dir}: the checkpoint does not fit the model (missing: "
                f"{missing[:3]}, unexpected: {unexpected[:3]}); was the model built from its "
                f"{ARCHITECTURE_FILE}?"
            )
