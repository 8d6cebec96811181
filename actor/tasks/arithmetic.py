"""The toy arithmetic task: "a+b=" -> "c" (e.g. "23+41=" -> "64"), exact-match reward.

This is what the embedded tiny model is warm-started on (tether.common.tiny_model), so the
prompt format here is the one the model knows. Options (TaskConfig.options, all strings):

- min_operand (default 10), max_operand (default 49): operands are drawn uniformly from
  [min_operand, max_operand]. The defaults give 2-digit addition whose operands and sums are
  all exactly two digits wide (1600 problems), so every digit sits at a fixed position. Measured
  on the tiny model: with operands 10..99 (sums of 2 or 3 digits) a 500-step warm start stays
  near 10% held-out accuracy; with 10..49 it passes 30% within 200 steps.
- ops (default "+"): operators to draw from, any of "+", "-", "*".

The held-out set is `task.eval_size` distinct problems drawn with `task.seed`; training prompts
are drawn from all other problems.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tether.actor.tasks.base import Prompt, Task
from tether.actor.tasks.registry import register_task
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _int_option(config: TaskConfig, key: str, default: int) -> int:
    raw = config.options.get(key, str(default))
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"task.options.{key}: must be an integer (got {raw!r})") from None


@register_task("arithmetic")
class ArithmeticTask(Task):
    """Integer arithmetic problems; reward 1.0 iff the stripped completion equals the answer."""

    def __init__(self, config: TaskConfig) -> None:
        unknown = set(config.options) - {"max_operand", "min_operand", "ops"}
        if unknown:
            raise ConfigError(f"task.options: unknown option(s) {sorted(unknown)} for task arithmetic "
                              "(known: max_operand, min_operand, ops)")
        self.min_operand = _int_option(config, "min_operand", 10)
        self.max_operand = _int_option(config, "max_operand", 49)
        if not 0 <= self.min_operand <= self.max_operand:
            raise ConfigError(f"task.options: need 0 <= min_operand <= max_operand "
                              f"(got {self.min_operand}, {self.max_operand})")
        self.ops = str(config.options.get("ops", "+")).strip()
        if not self.ops or any(op not in _OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ConfigError(f"task.options.ops: must be distinct characters from '+-*' (got {self.ops!r})")
        self.seed = config.seed
        self._span = self.max_operand - self.min_operand + 1
        self._universe = self._span * self._span * len(self.ops)
        # Training must keep most of the problem space, or the held-out set stops being a test.
        if config.eval_size * 2 > self._universe:
            raise ConfigError(f"task.eval_size: {config.eval_size} held-out problems would take more than half of "
                              f"the {self._universe} distinct problems; lower it or raise task.options.max_operand")
        rng = random.Random(f"arithmetic-eval:{self.seed}")
        self._eval_indices = sorted(rng.sample(range(self._universe), config.eval_size))
        self._eval_set = frozenset(self._eval_indices)

    def _prompt(self, index: int) -> Prompt:
        rest, op_index = divmod(index, len(self.ops))
        a, b = divmod(rest, self._span)
        a += self.min_operand
        b += self.min_operand
        op = self.ops[op_index]
        text = f"{a}{op}{b}="
        return Prompt(prompt_id=text[:-1], text=text, answer=str(_OPS[op](a, b)))

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        rng = random.Random(f"arithmetic-train:{self.seed}:{seed}")
        while True:
            index = rng.randrange(self._universe)
            if index not in self._eval_set:
                yield self._prompt(index)

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt(index) for index in self._eval_indices]

    def reward(self, prompt: Prompt, completion_text: str) -> float:
        return 1.0 if completion_text.strip() == prompt.answer else 0.0
