"""The Task interface: a prompt source plus a reward function."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tether.common.errors import TaskDataError


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task. `prompt_id` is stable across runs for the same data and seed.

    `messages` holds a chat prompt ([{"role": ..., "content": ...}, ...]) to be rendered with the
    model's chat template; `text` is then its plain-text form for display. `columns` are the dataset's
    other fields, handed to reward functions as keyword arguments (TRL's convention).
    """

    prompt_id: str
    text: str
    answer: str = ""
    messages: tuple[dict[str, str], ...] | None = None
    columns: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def raw(self) -> str | list[dict[str, str]]:
        """The prompt as TRL hands it to reward functions: text, or the list of chat messages."""
        return [dict(m) for m in self.messages] if self.messages is not None else self.text

    def reward_columns(self) -> dict[str, Any]:
        """The keyword arguments a reward function gets for this prompt (at least `answer` if set)."""
        columns = dict(self.columns)
        if self.answer and "answer" not in columns:
            columns["answer"] = self.answer
        return columns


class Task(ABC):
    """A verifiable task: prompts to train on, held-out prompts to evaluate on, and a reward.

    Subclasses are constructed from a TaskConfig (see `register_task`).
    """

    name: str = ""
    scorer = None
    """The RewardScorer `build_task` attaches (task.reward functions, or this task's own reward)."""

    @abstractmethod
    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        """An endless stream of training prompts, identical for the same seed."""

    @abstractmethod
    def eval_prompts(self) -> list[Prompt]:
        """The held-out prompts; never produced by `train_prompts`."""

    def reward(self, prompt: Prompt, completion_text: str) -> float | None:
        """Score of a completion (the generated text only, without the prompt).

        The task's own reward, used when `task.reward` names no reward function. A task that only
        scores with reward functions (the dataset task) leaves this unimplemented.
        """
        raise NotImplementedError(f"task {self.name!r} has no built-in reward: set task.reward")


def hold_out(rows: list, eval_size: int, seed_label: str, source: str) -> tuple[list, list]:
    """(held_out, pool): `eval_size` rows chosen by a seeded shuffle (the same rows on every actor
    and in every evaluation of the run), the rest in their original order."""
    if eval_size >= len(rows):
        raise TaskDataError(f"{source}: {len(rows)} rows cannot hold out task.eval_size={eval_size} "
                            "and still leave training rows; lower task.eval_size or set task.options.eval_path")
    order = list(range(len(rows)))
    random.Random(seed_label).shuffle(order)
    chosen = set(order[:eval_size])
    return [rows[i] for i in sorted(chosen)], [rows[i] for i in range(len(rows)) if i not in chosen]
