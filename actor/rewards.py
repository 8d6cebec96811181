"""Rewards as plain Python functions with TRL's signature, scored a batch at a time.

    scorer = RewardScorer.from_config(config.task, task)
    scored = scorer.score(prompts, completions, completion_ids)   # one reward per completion

A reward function (`task.reward: "module:function"` or `"path/to/file.py:function"`) is called as

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

exactly as TRL's GRPOTrainer calls `reward_funcs`: `prompts` are the raw prompts (text, or the list of
chat messages for a conversational dataset), `completions` the generated text (for a conversational
prompt: `[{"role": "assistant", "content": text}]`), and every other dataset column is passed as a
keyword argument holding one value per sample. A function returns one value per sample; None means
"no reward from this function for this sample". Several functions combine as TRL does: the weighted
sum over the functions that gave a value; a sample none of them scored gets 0.0 and is counted.

A function that raises or returns something unusable never stops the actor: the batch is scored again
one sample at a time to find the offending samples, each is logged (prompt, completion, error) and
counted, and scored as None by that function. Without `task.reward` the task's own `reward` is used,
under the same protection.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tether.actor.tasks.base import Prompt, Task
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError
from tether.common.logging import get_logger

log = get_logger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
MAX_LOGGED_TEXT = 500
"""Characters of a prompt or completion shown in an error log line."""
STATS_EVERY = 1000
"""Scored samples between two `reward_stats` log lines (only when something was None or failed)."""


def load_reward_function(spec: str) -> RewardFn:
    """Import `module:function` (an importable module) or `file.py:function` (a path, as verl's
    custom_reward_function names one); ConfigError naming the spec when it cannot be loaded."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f'task.reward: {spec!r} must be "module:function" or "path/to/file.py:function"')
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"task.reward: {spec!r}: file {path} does not exist")
        module_name = f"tether_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"task.reward: {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ConfigError(f"task.reward: {spec!r}: cannot import module {where!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"task.reward: {spec!r}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise ConfigError(f"task.reward: {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_LOGGED_TEXT else text[:MAX_LOGGED_TEXT] + "..."


def _check_values(values: Any, n: int) -> list[float | None]:
    """The function's return value as n floats or None; ValueError saying what is wrong."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"returned {type(values).__name__}, expected a list of {n} floats (or None)")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"returned {value!r}, which is not a number or None") from None
        if not math.isfinite(number):
            raise ValueError(f"returned {number}, rewards must be finite (None means no reward)")
        out.append(number)
    return out


@dataclass
class RewardStats:
    """Counters of one scorer since it was built (logged by the actor, asserted by tests)."""

    samples: int = 0
    """Completions scored."""
    errors: dict[str, int] = field(default_factory=dict)
    """Samples a function failed on (raised or returned something unusable), per function."""
    none: dict[str, int] = field(default_factory=dict)
    """Samples a function gave no reward (None), per function."""
    unscored: int = 0
    """Samples that no function scored; their reward is 0.0."""


@dataclass(frozen=True)
class ScoredBatch:
    rewards: list[float]
    """The combined reward of each completion (always finite)."""
    per_function: dict[str, list[float | None]]
    """Each function's own values (None: no reward or an error)."""


class RewardScorer:
    """Scores completions with the configured reward functions (or the task's own reward)."""

    def __init__(self, functions: Sequence[tuple[str, RewardFn]], weights: Sequence[float] | None = None,
                 *, task: Task | None = None):
        if not functions and task is None:
            raise ValueError("RewardScorer needs at least one reward function or a task")
        self.functions = list(functions)
        self.task = task if not self.functions else None
        names = [name for name, _ in self.functions] or [f"{task.name or 'task'}.reward"]
        self.names = names
        self.weights = list(weights) if weights else [1.0] * len(names)
        if len(self.weights) != len(names):
            raise ValueError(f"{len(self.weights)} weights for {len(names)} reward functions")
        self.stats = RewardStats()

    @classmethod
    def from_config(cls, config: TaskConfig, task: Task) -> RewardScorer:
        """The functions named by task.reward with task.reward_weights; without any, the task's own reward."""
        if config.reward:
            return cls([(spec, load_reward_function(spec)) for spec in config.reward], config.reward_weights)
        if type(task).reward is Task.reward:
            raise ConfigError(f"task.reward: task {task.name!r} has no built-in reward; name a reward function "
                              '("module:function" or "file.py:function")')
        return cls([], task=task)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str],
              completion_ids: Sequence[Sequence[int]] | None = None) -> ScoredBatch:
        """One combined reward per (prompt, completion); never raises because of a reward function."""
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"{n} prompts but {len(completions)} completions")
        ids = [list(c) for c in completion_ids] if completion_ids is not None else [[] for _ in range(n)]
        if self.task is not None:
            calls = [(self.names[0], _TaskReward(self.task))]
        else:
            calls = [(name, _TrlCall(fn)) for name, fn in self.functions]
        per_function = {name: self._call(name, call, prompts, completions, ids) for name, call in calls}
        rewards = []
        for i in range(n):
            given = [w * per_function[name][i] for name, w in zip(self.names, self.weights, strict=True)
                     if per_function[name][i] is not None]
            if not given:
                self.stats.unscored += 1
            rewards.append(float(sum(given)) if given else 0.0)
        before = self.stats.samples
        self.stats.samples += n
        if self.stats.samples // STATS_EVERY > before // STATS_EVERY and (self.stats.errors or self.stats.none):
            log.info("reward_stats", samples=self.stats.samples, errors=dict(self.stats.errors),
                     none=dict(self.stats.none), unscored=self.stats.unscored)
        return ScoredBatch(rewards=rewards, per_function=per_function)

    def _call(self, name: str, call, prompts: Sequence[Prompt], completions: Sequence[str],
              ids: list[list[int]]) -> list[float | None]:
        try:
            values = _check_values(call(prompts, completions, ids), len(prompts))
            failed = 0
        except Exception as exc:  # noqa: BLE001  a user's function may raise anything; find the samples that do it
            log.warning("reward_function_batch_error", function=name, samples=len(prompts),
                        error=f"{type(exc).__name__}: {exc}", action="scoring the batch one sample at a time")
            results = [self._call_one(name, call, p, c, i) for p, c, i in zip(prompts, completions, ids, strict=True)]
            values = [value for value, _ in results]
            failed = sum(error for _, error in results)
        nones = sum(v is None for v in values) - failed
        if nones:
            self.stats.none[name] = self.stats.none.get(name, 0) + nones
        return values

    def _call_one(self, name: str, call, prompt: Prompt, completion: str, ids: list[int]) -> tuple[float | None, bool]:
        try:
            return _check_values(call([prompt], [completion], [ids]), 1)[0], False
        except Exception as exc:  # noqa: BLE001
            count = self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
            log.error("reward_function_error", function=name, error=f"{type(exc).__name__}: {exc}",
                      prompt_id=prompt.prompt_id, prompt=_short(prompt.raw), completion=_short(completion),
                      errors_so_far=count)
            return None, True


def trl_arguments(prompts: Sequence[Prompt], completions: Sequence[str], ids: list[list[int]]) -> dict[str, Any]:
    """TRL's keyword arguments: prompts, completions, completion_ids and one list per dataset column."""
    keys: list[str] = []
    for prompt in prompts:
        keys += [k for k in prompt.reward_columns() if k not in keys]
    columns = {key: [p.reward_columns().get(key) for p in prompts] for key in keys
               if key not in ("prompt", "prompts", "completion", "completions", "completion_ids")}
    return {
        "prompts": [p.raw for p in prompts],
        "completions": [[{"role": "assistant", "content": c}] if p.messages is not None else c
                        for p, c in zip(prompts, completions, strict=True)],
        "completion_ids": ids,
        **columns,
    }


class _TrlCall:
    """A user's reward function called with TRL's keyword arguments."""

    def __init__(self, fn: RewardFn):
        self.fn = fn

    def __call__(self, prompts, completions, ids):
        return self.fn(**trl_arguments(prompts, completions, ids))


class _TaskReward:
    """A task's own `reward(prompt, completion_text)`, called per sample."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, prompts, completions, ids):
        return [self.task.reward(p, c) for p, c in zip(prompts, completions, strict=True)]
