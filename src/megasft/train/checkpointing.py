"""Training checkpoints: written atomically, kept K at a time, resumed exactly.

`SAVE/iter_NNNNNNN/` is a megasft megatron checkpoint (model and optimizer state, plus
`architecture.json`, `hf/`, `train_state.json` and every rank's generator states), written
into `.iter_NNNNNNN.partial/` and renamed into place when every rank has finished; then the
pointer `latest_checkpointed_iteration.txt` is replaced and checkpoints beyond the newest K
removed. The layout and what resuming restores: docs/train.md, "Output" and "Checkpoints and
resuming".
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megasft.constants import ARCHITECTURE_FILE, HF_FILES_DIR
from megasft.errors import ConfigError
from megasft.megatron.compat import check_checkpoint_readable
from megasft.megatron.peft.registry import ADAPTER_MODULE

LATEST_FILE = "latest_checkpointed_iteration.txt"
TRAIN_STATE_FILE = "train_state.json"
RNG_DIR = "rng"
_ITERATION = re.compile(r"iter_(\d{7,})")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_name(step: int) -> str:
    """The directory name of the checkpoint of `step` (`iter_0000200`).

    Args:
        step: the optimizer step.

    Returns:
        The name.
    """
    return f"iter_{step:07d}"


def complete_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `save_dir`, oldest first.

    Args:
        save_dir: the run's `--save` directory (it may not exist).

    Returns:
        The `iter_*` directories that hold a train state.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in save_dir.iterdir()
        if path.is_dir()
        and (match := _ITERATION.fullmatch(path.name))
        and (path / TRAIN_STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `save_dir`.

    Args:
        save_dir: the run's `--save` directory (it may not exist).

    Returns:
        Its path, or None when there is none.
    """
    checkpoints = complete_checkpoints(save_dir)
    return checkpoints[-1] if checkpoints else None


def remove_partial_checkpoints(save_dir: Path) -> None:
    """Remove `.iter_*.partial` directories: checkpoints whose writing was interrupted.

    Args:
        save_dir: the run's `--save` directory.
    """
    for path in save_dir.glob(".iter_*.partial"):
        shutil.rmtree(path, ignore_errors=True)


def _unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron-core's DDP wrapper, whose keys carry a `module.` prefix
    that a converted checkpoint does not have."""
    return getattr(chunk, "module", chunk)


def _model_state_dict(
    model_chunks: list[torch.nn.Module], *, adapters_only: bool = False
) -> dict[str, Any]:
    def chunk_state(chunk: torch.nn.Module) -> dict[str, Any]:
        state = _unwrapped(chunk).sharded_state_dict()
        if adapters_only:  # a PEFT run: its frozen base stays in --load
            state = {key: value for key, value in state.items() if is_adapter_key(key)}
        return state

    if len(model_chunks) == 1:
        return {"model": chunk_state(model_chunks[0])}
    return {f"model{index}": chunk_state(chunk) for index, chunk in enumerate(model_chunks)}


def is_adapter_key(key: str) -> bool:
    """Whether a model checkpoint key is a PEFT adapter's tensor (see megasft.megatron.peft)."""
    return f".{ADAPTER_MODULE}." in key


def _sharded_state_dict(
    model_chunks, optimizer, *, is_loading: bool, adapters_only: bool = False
) -> dict[str, Any]:
    state = _model_state_dict(model_chunks, adapters_only=adapters_only)
    # The optimizer state is keyed by the model's sharded tensors. The distributed optimizer's
    # "dp_reshardable" layout (its shards as they are, written in parallel) resumes at any
    # data-parallel size but the same TP/PP (megatron-core 0.16 cannot save the
    # TP/PP-reshardable "fully_sharded_model_space" layout: it refuses flattened ranges).
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
    )
    return state


def rng_state() -> dict[str, Any]:
    """This rank's random generator states: python, numpy, torch, CUDA (with an accelerator)
    and megatron-core's tensor-parallel tracker.
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megasft.megatron.cpu import accelerator_present

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if accelerator_present():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random generator states `rng_state` returned.

    Args:
        state: what `rng_state` returned (on a rank of the same world size).
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    save_dir: Path,
    step: int,
    model_chunks: list[torch.nn.Module],
    optimizer,
    train_state: dict[str, Any],
    *,
    source_checkpoint: Path,
    keep: int,
    adapters_only: bool = False,
) -> Path:
    """Write the checkpoint of `step` (collective: every rank calls it).

    Args:
        save_dir: the run's `--save` directory.
        step: the optimizer step.
        model_chunks: this rank's model chunks (one per virtual pipeline stage).
        optimizer: megatron-core's optimizer.
        train_state: the step, counters and identity, saved as train_state.json.
        source_checkpoint: the `--load` checkpoint, whose architecture.json and hf/ are copied.
        keep: how many checkpoints to keep (older ones are removed).
        adapters_only: a PEFT run: the model part is the adapters' tensors alone.

    Returns:
        The checkpoint's path.
    """
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = save_dir / iteration_name(step)
    staging = save_dir / f".{final.name}.partial"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()

    dist_checkpointing.save(
        _sharded_state_dict(model_chunks, optimizer, is_loading=False, adapters_only=adapters_only),
        staging,
    )
    (staging / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng_state(), staging / RNG_DIR / f"rank_{rank:05d}.pt")
    dist.barrier()  # every rank's files are written

    if rank == 0:
        shutil.copyfile(source_checkpoint / ARCHITECTURE_FILE, staging / ARCHITECTURE_FILE)
        if (source_checkpoint / HF_FILES_DIR).is_dir():
            shutil.copytree(source_checkpoint / HF_FILES_DIR, staging / HF_FILES_DIR)
        _write_atomically(
            staging / TRAIN_STATE_FILE, json.dumps(train_state, indent=2, sort_keys=True) + "\n"
        )
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        staging.rename(final)
        _write_atomically(save_dir / LATEST_FILE, f"{step}\n")
        for old in complete_checkpoints(save_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    checkpoint: Path,
    model_chunks: list[torch.nn.Module],
    optimizer,
    *,
    world_size: int,
    adapters_only: bool = False,
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's random generators from `checkpoint` (collective).

    Args:
        checkpoint: an `iter_*` directory.
        model_chunks: this rank's model chunks.
        optimizer: megatron-core's optimizer.
        world_size: this run's processes (generators restart from the seed when it differs).
        adapters_only: a PEFT run: only the adapters are read (the base came from --load).

    Returns:
        The checkpoint's train state (step, counters).
    """
    from megatron.core import dist_checkpointing

    check_checkpoint_readable(checkpoint)
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        # The distributed optimizer reads Adam's per-parameter "step" while building what to
        # load, and a fresh torch Adam (no Apex / Transformer Engine, as on CPU) has none
        # yet: megatron-core's own remedy is one step on zero gradients, overwritten below.
        if hasattr(part, "_init_optimizer_states_with_dummy_values") and not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()
    state = dist_checkpointing.load(
        _sharded_state_dict(model_chunks, optimizer, is_loading=True, adapters_only=adapters_only),
        str(checkpoint),
    )
    for index, chunk in enumerate(model_chunks):
        chunk_state = state["model"] if len(model_chunks) == 1 else state[f"model{index}"]
        _unwrapped(chunk).load_state_dict(chunk_state, strict=not adapters_only)
    with torch.no_grad():  # megatron-core 0.16 copies into parameter views without it
        optimizer.load_state_dict(state["optimizer"])
    train_state = json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
    if train_state.get("adam_step") is not None:
        _set_adam_step(optimizer, train_state["adam_step"])

    rng_file = checkpoint / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
    if train_state.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif dist.get_rank() == 0:
        print(
            f"megasft train: {checkpoint} was written by {train_state.get('world_size')} "
            f"processes, this run has {world_size}: random generators start afresh from --seed",
            flush=True,
        )
    return train_state


def check_resumable(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint whose data order would differ from this run's.

    Args:
        checkpoint: an `iter_*` directory.
        identity: what fixes the order: global_batch_size, seed and the dataset's fingerprint
            (the sha256 of its manifest).

    Raises:
        ConfigError: a setting differs (the message names it and what to do).
    """
    saved = json.loads((checkpoint / TRAIN_STATE_FILE).read_text()).get("identity", {})
    for name, value in identity.items():
        if name in saved and saved[name] != value:
            raise ConfigError(
                f"{checkpoint} was trained with {name} {saved[name]!r}, this run has "
                f"{value!r}; resuming would not continue the same run. Use the same "
                f"setting, or a new --save directory (with --load {checkpoint} for its weights)"
            )


def check_same_base(checkpoint: Path, base: dict[str, str] | None) -> None:
    """Refuse to resume a PEFT checkpoint on another base (its adapters fit their own only),
    or to mix PEFT and full fine-tuning checkpoints.

    Args:
        checkpoint: the checkpoint to resume.
        base: a PEFT run's base reference ({"checkpoint": --load, "sha256": its
            fingerprint}); None for full fine-tuning.

    Raises:
        ConfigError: the base's fingerprint differs, or one side is PEFT and the other not.
    """
    saved = json.loads((checkpoint / TRAIN_STATE_FILE).read_text()).get("peft")
    if base is None:
        if saved is not None:
            raise ConfigError(
                f"{checkpoint} holds {saved['method']} adapters only, this run has no --peft; "
                f"resume with --peft {saved['method']}, or start a new --save directory"
            )
        return
    if saved is None:
        raise ConfigError(
            f"{checkpoint} is a full fine-tuning checkpoint, this run has --peft; use a new "
            f"--save directory (with --load {checkpoint} to train adapters on its weights)"
        )
    if saved["base"]["sha256"] != base["sha256"]:
        raise ConfigError(
            f"--load {base['checkpoint']} is not the base the adapters in {checkpoint} were "
            f"trained on ({saved['base']['checkpoint']}, {saved['base']['sha256']}; this "
            f"--load has {base['sha256']}). Resume with --load {saved['base']['checkpoint']}, "
            "or start a new --save directory"
        )


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron-core's (chained) optimizer."""
    return [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])]


def adam_step(optimizer) -> float | None:
    """Adam's update count (for its bias correction), where torch keeps it per parameter.

    Args:
        optimizer: megatron-core's optimizer.

    Returns:
        The count, or None before the first update.
    """
    for inner in _inner_optimizers(optimizer):
        for parameter_state in inner.state.values():
            if "step" in parameter_state:
                return float(parameter_state["step"])
    return None


def _set_adam_step(optimizer, step: float) -> None:
    """Give every parameter's Adam state the saved update count, each its own tensor.

    On the distributed optimizer without Apex or Transformer Engine (the CPU), megatron-core
    0.16 loads this count wrongly: it copies the count of the state the load started from
    over the saved one, and shares one tensor between all parameters, which torch's Adam
    then increments once per parameter. Saved by us in train_state.json, it is set here.
    """
    for inner in _inner_optimizers(optimizer):
        for parameter_state in inner.state.values():
            if "step" in parameter_state:
                parameter_state["step"] = torch.tensor(step, dtype=torch.float32)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
