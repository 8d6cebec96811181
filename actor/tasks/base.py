"""The Task interface: a prompt source plus a reward function."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task. `prompt_id` is stable across runs for the same data and seed."""

    prompt_id: str
    text: str
    answer: str


class Task(ABC):
    """A verifiable task: prompts to train on, held-out prompts to evaluate on, and a reward.

    Subclasses are constructed from a TaskConfig (see `register_task`).
    """

    name: str = ""

    @abstractmethod
    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        """An endless stream of training prompts, identical for the same seed."""

    @abstractmethod
    def eval_prompts(self) -> list[Prompt]:
        """The held-out prompts; never produced by `train_prompts`."""

    @abstractmethod
    def reward(self, prompt: Prompt, completion_text: str) -> float:
        """Score of a completion (the generated text only, without the prompt)."""
