"""Task registry: `@register_task("name")` on a Task subclass, `build_task(config)` to get one.

Every module in this package is imported on first lookup, so adding a task is one new file
with a decorated class in it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from tether.actor.tasks.base import Task
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError

# Filled by decorators at import time only; nothing mutates it afterwards.
_TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a Task subclass under `name` (constructed as cls(config))."""

    def decorate(cls: type[Task]) -> type[Task]:
        existing = _TASKS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"task name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorate


def _import_task_modules() -> None:
    package = importlib.import_module("tether.actor.tasks")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("base", "registry"):
            importlib.import_module(f"tether.actor.tasks.{module.name}")


def task_names() -> list[str]:
    """Names of all registered tasks."""
    _import_task_modules()
    return sorted(_TASKS)


def build_task(config: TaskConfig) -> Task:
    """Construct the task named by `config.name`; ConfigError naming the known tasks otherwise.

    The task's `scorer` is set from task.reward / task.reward_weights (tether.actor.rewards), so a
    reward function that cannot be imported fails here, at start-up, naming the spec.
    """
    from tether.actor.rewards import RewardScorer

    names = task_names()
    if config.name not in _TASKS:
        raise ConfigError(f"task.name: unknown task {config.name!r} (registered: {', '.join(names)})")
    task = _TASKS[config.name](config)
    task.scorer = RewardScorer.from_config(config, task)
    return task
