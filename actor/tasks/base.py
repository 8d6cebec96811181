"""The Task interface: a prompt source plus a reward function."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


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
