"""What a resumed run must share with the checkpoint it resumes, checked before it starts.

A checkpoint's train_state.json holds the settings it was trained with. Resuming continues
that run, so these must not change:

- the learning-rate schedule: --train-iters (or --epochs), --warmup-iters, --lr, --min-lr;
- the optimizer state's form: --precision (fp32 main weights exist under bf16 only),
  --distributed-optimizer, --virtual-pipeline-stages (the state is saved per model chunk);
- with the distributed optimizer, --tp, --pp and --cp: its state is saved in its data-parallel
  shards, which megatron-core 0.16 can regroup for another data-parallel size only.

Without the distributed optimizer the state is saved per tensor, and megatron-core reshards it
to another --tp or --pp on load. The data order (--global-batch-size, --seed, the dataset) is
checked by `megasft.train.checkpointing.check_resumable`. See docs/train.md ("Resuming").
"""

from __future__ import annotations

import json
from pathlib import Path

from megasft.errors import ConfigError
from megasft.train.checkpointing import TRAIN_STATE_FILE
from megasft.train.config import TrainConfig

SCHEDULE = (
    ("train_iters", "--train-iters"),
    ("warmup_iters", "--warmup-iters"),
    ("lr", "--lr"),
    ("min_lr", "--min-lr"),
)
OPTIMIZER_FORM = (
    ("precision", "--precision"),
    ("virtual_pipeline_stages", "--virtual-pipeline-stages"),
)
SHARDED_BY_DATA_RANK = (
    ("tensor_parallel", "--tp"),
    ("pipeline_parallel", "--pp"),
    ("context_parallel", "--cp"),
)


def saved_distributed_optimizer(train_state: dict) -> bool | None:
    """Whether the checkpoint's optimizer state is the distributed optimizer's (None: not
    recorded, in a checkpoint older than this record)."""
    layout = train_state.get("layout", {})
    if "distributed_optimizer" in layout:
        return bool(layout["distributed_optimizer"])
    return train_state.get("config", {}).get("distributed_optimizer")


def resume_problems(
    train_state: dict, config: TrainConfig, *, distributed_optimizer: bool
) -> list[str]:
    """What differs between a checkpoint's settings and this run's, and why it matters.

    Args:
        train_state: the checkpoint's train_state.json.
        config: this run's settings (train_iters resolved).
        distributed_optimizer: whether this run uses the distributed optimizer.

    Returns:
        One sentence per setting that differs and cannot change on resume; empty if none.
    """
    saved = train_state.get("config", {})
    problems = []

    def differs(name: str) -> bool:
        return name in saved and saved[name] != getattr(config, name)

    for name, flag in SCHEDULE:
        if differs(name):
            problems.append(
                f"{flag} was {saved[name]}, now {getattr(config, name)}: the learning-rate "
                "schedule (warmup, then cosine to --min-lr at step --train-iters) would change "
                "for every remaining step"
            )
    for name, flag in OPTIMIZER_FORM:
        if differs(name):
            problems.append(
                f"{flag} was {saved[name]}, now {getattr(config, name)}: the optimizer state "
                "was saved in another form"
            )
    was_distributed = saved_distributed_optimizer(train_state)
    if was_distributed is not None and was_distributed != distributed_optimizer:
        problems.append(
            f"the checkpoint was saved {'with' if was_distributed else 'without'} the "
            f"distributed optimizer, this run is {'with' if distributed_optimizer else 'without'} "
            "it (--distributed-optimizer / --no-distributed-optimizer): its state is laid out "
            "differently"
        )
    elif was_distributed:
        for name, flag in SHARDED_BY_DATA_RANK:
            if differs(name):
                problems.append(
                    f"{flag} was {saved[name]}, now {getattr(config, name)}: the distributed "
                    "optimizer's state is saved in its data-parallel shards, which can be "
                    "regrouped for another data-parallel size only"
                )
    return problems


def check_resume(checkpoint: Path, config: TrainConfig, *, distributed_optimizer: bool) -> None:
    """Refuse to resume `checkpoint` with settings it cannot continue with, naming each.

    Args:
        checkpoint: the newest complete checkpoint in --save.
        config: this run's settings (train_iters resolved).
        distributed_optimizer: whether this run uses the distributed optimizer.

    Raises:
        ConfigError: listing every setting that differs, with the two ways on.
    """
    state_file = Path(checkpoint) / TRAIN_STATE_FILE
    try:
        train_state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {state_file}: {error}") from error
    problems = resume_problems(train_state, config, distributed_optimizer=distributed_optimizer)
    if problems:
        raise ConfigError(
            f"--save {config.save} holds {Path(checkpoint).name}, which this run would resume, "
            f"but {'; '.join(problems)}. Resume with the checkpoint's settings (the "
            f"config in its {TRAIN_STATE_FILE}), or start a new --save directory with --load {checkpoint} (its "
            "weights, with a fresh optimizer and schedule)"
        )
