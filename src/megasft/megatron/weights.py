"""Load the weights of a converted (or trained) checkpoint into a model at any TP/PP.

The model's `sharded_state_dict()` says which slice of every global tensor this rank holds;
megatron-core's `dist_checkpointing.load` reads exactly those slices. Only weights are loaded:
`_extra_state` entries (Transformer Engine's FP8 scaling state, empty for the local layers)
are skipped, so a checkpoint written with one layer spec loads into a model of the other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megasft.checkpoint.layout import ARCHITECTURE_FILE
from megasft.errors import ConfigError
from megasft.megatron.architecture import ModelArchitecture

_EXTRA_STATE = "_extra_state"


def read_architecture(checkpoint_dir: str | os.PathLike) -> ModelArchitecture:
    """The architecture saved with a megasft megatron checkpoint."""
    return ModelArchitecture.load(Path(checkpoint_dir) / ARCHITECTURE_FILE)


def load_weights(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load this rank's slice of every weight of `model` (a `GPTModel` of any TP/PP stage)
    from the megatron checkpoint in `checkpoint_dir`. Call on every rank."""
    sharded_state_dict = {
        name: value
        for name, value in model.sharded_state_dict().items()
        if not (isinstance(value, ShardedObject) or name.endswith(_EXTRA_STATE))
    }
    state_dict = dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if not name.endswith(_EXTRA_STATE)]
    if missing or unexpected:
        raise ConfigError(
            f"{checkpoint_dir}: the checkpoint does not fit the model (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}); was the model built from its {ARCHITECTURE_FILE}?"
        )
