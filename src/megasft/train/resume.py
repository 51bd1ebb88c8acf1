"""What a resumed run must share with the checkpoint it resumes, checked before it starts.

A checkpoint's train_state.json holds the settings it was trained with. Resuming continues
that run, so these must not change:

- the learning-rate schedule: --train-iters (or --epochs), --warmup-iters, --lr, --min-lr;
- the optimizer state's form: --precision (fp32 main weights exist under bf16 only),
  --distributed-optimizer, --virtual-pipeline-stages (the state is saved per model chunk),
  and whether an MoE model's experts have an optimizer of their own (EP > 1 or ETP != TP);
- with the distributed optimizer, --tp, --pp, --cp, and for MoE models --ep and --etp: its
  state is saved in its (expert-)data-parallel shards, which megatron-core can regroup for
  another data-parallel size only.

Without the distributed optimizer the state is saved per tensor, and megatron-core reshards it
to another --tp, --pp, --ep or --etp on load (within the form above). The MoE token
dispatcher and load-balancing coefficient may change, and so may --recompute (memory only),
the dropout rates and --fp8 (neither is in the optimizer state). The data order (--global-batch-size,
--seed, the dataset) is checked by `megasft.train.checkpointing.check_resumable`. See
docs/train.md ("Checkpoints and resuming").
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
    ("expert_parallel", "--ep"),
    ("expert_tensor_parallel", "--etp"),
)


def saved_distributed_optimizer(train_state: dict) -> bool | None:
    """Whether the checkpoint's optimizer state is the distributed optimizer's (None: not
    recorded, in a checkpoint older than this record)."""
    layout = train_state.get("layout", {})
    if "distributed_optimizer" in layout:
        return bool(layout["distributed_optimizer"])
    return train_state.get("config", {}).get("distributed_optimizer")


def _used(settings: dict, name: str) -> Any:
    """The value of a setting as a run used it: an unset --etp is --tp."""
    if name == "expert_tensor_parallel":
        return settings.get(name) or settings.get("tensor_parallel", 1)
    return settings[name]


def _experts_apart(settings: dict) -> bool:
    """Whether megatron-core gives the experts their own optimizer (a second one in its
    `ChainedOptimizer`, saved under `chained_1.`): when they have their own process groups,
    with EP > 1 (0.16 and 0.19) or an ETP other than TP (0.19)."""
    expert_tensor = _used(settings, "expert_tensor_parallel")
    return settings["expert_parallel"] > 1 or expert_tensor != settings["tensor_parallel"]


def _expert_layout(settings: dict) -> str:
    expert_tensor = _used(settings, "expert_tensor_parallel")
    return (
        f"at EP={settings.get('expert_parallel', 1)}, ETP={expert_tensor}, "
        f"TP={settings.get('tensor_parallel', 1)}"
    )


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
    saved, current = train_state.get("config", {}), asdict(config)
    problems = []

    def differs(name: str) -> bool:
        if name == "expert_tensor_parallel" and not (saved.get(name) or current[name]):
            return False  # unset on both sides, ETP is TP: a change is named as --tp's
        return name in saved and _used(saved, name) != _used(current, name)

    for name, flag in SCHEDULE:
        if differs(name):
            problems.append(
                f"{flag} was {saved[name]}, now {current[name]}: the learning-rate "
                "schedule (warmup, then cosine to --min-lr at step --train-iters) would change "
                "for every remaining step"
            )
    for name, flag in OPTIMIZER_FORM:
        if differs(name):
            problems.append(
                f"{flag} was {saved[name]}, now {current[name]}: the optimizer state "
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
                    f"{flag} was {_used(saved, name)}, now {_used(current, name)}: the "
                    "distributed optimizer's state is saved in its data-parallel shards, which "
                    "can be regrouped for another data-parallel size only"
                )
    # (a checkpoint from before --ep existed has no experts apart)
    experts_apart = "expert_parallel" in saved and _experts_apart(saved)
    if not was_distributed and experts_apart != _experts_apart(current):
        problems.append(
            f"--ep / --etp: the checkpoint was saved {_expert_layout(saved)}, this run is "
            f"{_expert_layout(current)}: megatron-core keeps the experts' optimizer state "
            "apart from the other parameters' when EP > 1 or ETP differs from TP, so it was "
            "saved in another form"
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
            f"but {'; '.join(problems)}. Resume with the checkpoint's settings (the config "
            f"in its {TRAIN_STATE_FILE}), or start a new --save directory with --load "
            f"{checkpoint} (its weights, with a fresh optimizer and schedule)"
        )
