"""The evaluation tasks, by their `--task` name: `gsm8k`, `exact-match`, `format`, `lm-eval:TASK`.

Each task is one module of this package holding a `Task` subclass (`base.py`) registered with
`@register_task`, or a factory for a family of names (`PREFIX:NAME`, such as lm-evaluation-
harness's tasks) registered with `@register_task_family`; the registry imports every module of
the package on first use, so a new task is one new module plus its tests (docs/evaluate.md,
"Adding a task").
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
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
    "register_task_family",
    "task_choices",
    "task_families",
    "task_names",
]

_TASKS: dict[str, Task] = {}
_FAMILIES: dict[str, Callable[[str], Task]] = {}
_discovered = False
TaskType = TypeVar("TaskType", bound=type[Task])
FAMILY_SEPARATOR = ":"


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


def register_task_family(prefix: str) -> Callable[[Callable[[str], Task]], Callable[[str], Task]]:
    """Decorator: `factory(name)` makes the task for every `--task PREFIX:NAME`.

    Args:
        prefix: the part of the task name before the colon, e.g. "lm-eval".

    Returns:
        The decorator, which returns the factory unchanged.

    Raises:
        ValueError: when another factory already registered that prefix.
    """

    def register(factory: Callable[[str], Task]) -> Callable[[str], Task]:
        known = _FAMILIES.get(prefix)
        if known is not None and known is not factory:
            raise ValueError(f"two evaluation task families named {prefix!r}")
        _FAMILIES[prefix] = factory
        return factory

    return register


def _tasks() -> dict[str, Task]:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return _TASKS


def task_names() -> tuple[str, ...]:
    """Every registered task's name, sorted (the families' tasks are not listed)."""
    return tuple(sorted(_tasks()))


def task_families() -> tuple[str, ...]:
    """Every task family's prefix, sorted: `--task PREFIX:NAME` names one of its tasks."""
    _tasks()
    return tuple(sorted(_FAMILIES))


def task_choices() -> str:
    """What `--task` accepts, for help texts and errors: "exact-match, ..., or lm-eval:TASK"."""
    families = [f"{prefix}{FAMILY_SEPARATOR}TASK" for prefix in task_families()]
    names = [*task_names(), *families]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def get_task(name: str) -> Task:
    """The task registered as `name`, or made by the family its `PREFIX:` names.

    Raises:
        ConfigError: for a name no task or family has, listing the names there are; or what
            the family's factory raises for a name it cannot make.
    """
    task = _tasks().get(name)
    if task is not None:
        return task
    prefix, separator, rest = name.partition(FAMILY_SEPARATOR)
    factory = _FAMILIES.get(prefix) if separator else None
    if factory is None:
        raise ConfigError(f"--task must be one of {task_choices()}, not {name!r}")
    return factory(rest)


def metric_names() -> tuple[str, ...]:
    """Every metric some task gives, each once, in the order the tasks (by name) list them."""
    names: dict[str, None] = {}
    for name in task_names():
        names.update(dict.fromkeys(_tasks()[name].metric_names))
    return tuple(names)
