"""The evaluation tasks, by their `--task` name: `gsm8k`, `exact-match`, `format`.

Each task is one module of this package holding a `Task` subclass (`base.py`) registered with
`@register_task`; the registry imports every module of the package on first use, so a new task
is one new module plus its tests (docs/evaluate.md, "Adding a task").
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from megasft.errors import ConfigError
from megasft.evaluate.tasks.base import Extraction, Score, Task

__all__ = [
    "Extraction",
    "Score",
    "Task",
    "get_task",
    "metric_names",
    "register_task",
    "task_names",
]

_TASKS: dict[str, Task] = {}
_discovered = False
TaskType = TypeVar("TaskType", bound=type[Task])


def register_task(cls: TaskType) -> TaskType:
    """Class decorator: makes an instance of `cls` the task named `cls.name`.

    Raises:
        ValueError: when another class already registered that name.
    """
    known = _TASKS.get(cls.name)
    if known is not None and type(known) is not cls:
        raise ValueError(f"two evaluation tasks named {cls.name!r}: {type(known)} and {cls}")
    _TASKS[cls.name] = cls()
    return cls


def _tasks() -> dict[str, Task]:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return _TASKS


def task_names() -> tuple[str, ...]:
    """Every registered task's name, sorted: the choices of `--task`."""
    return tuple(sorted(_tasks()))


def get_task(name: str) -> Task:
    """The task registered as `name`.

    Raises:
        ConfigError: for a name no task has, listing the names there are.
    """
    task = _tasks().get(name)
    if task is None:
        raise ConfigError(f"--task must be one of {', '.join(task_names())}, not {name!r}")
    return task


def metric_names() -> tuple[str, ...]:
    """Every metric some task gives, each once, in the order the tasks (by name) list them."""
    names: dict[str, None] = {}
    for name in task_names():
        names.update(dict.fromkeys(_tasks()[name].metric_names))
    return tuple(names)
