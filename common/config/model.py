"""Model and task configuration, shared by actor and learner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.common.config.base import Section

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class ModelConfig(Section):
    """The policy model, loaded identically by actors and learner."""

    SECTION = "model"

    path: str = ""
    """Hugging Face model directory. Empty: build the embedded tiny model into <run_dir>/tiny-model."""
    dtype: str = "auto"
    """Body dtype on both sides. auto: bfloat16 on CUDA, float32 on CPU."""
    fp32_lm_head: bool = True
    """Hold lm_head weights in fp32 and compute the final projection in fp32 (actor and learner)."""

    def __post_init__(self) -> None:
        self.require_choice("dtype", DTYPES)


@dataclass(kw_only=True)
class TaskConfig(Section):
    """The task: where prompts come from and how completions are rewarded."""

    SECTION = "task"

    name: str = "arithmetic"
    """Registered task name (see tether.actor.tasks)."""
    path: str = ""
    """Data file for file-backed tasks: jsonl (JSON lines), dataset (JSON lines, Parquet, Arrow, CSV or a
    `save_to_disk` directory, read with the `datasets` library)."""
    eval_size: int = 200
    """Held-out prompts used for greedy accuracy."""
    seed: int = 0
    """Seed of the task's train/eval split and of its prompt order; each actor mixes in its actor_id
    (actor.rollouts.actor_seed), so the actors of a run draw different prompts."""
    options: dict[str, str] = field(default_factory=dict)
    """Task-specific options, e.g. {max_operand: "99"} for arithmetic."""
    reward: Any = ""
    """Reward function(s) in Python replacing the task's own: "module:function" or "path/to/file.py:function",
    or a list of them. TRL's signature: fn(prompts, completions, completion_ids, **columns) -> list of
    float or None (None: no reward from this function for that sample). Empty: the task's own reward."""
    reward_weights: list[float] = field(default_factory=list)
    """Weight of each function in task.reward (TRL's reward_weights); the reward is the weighted sum over the
    functions that did not return None. Empty: every weight 1."""

    def __post_init__(self) -> None:
        self.require(bool(self.name), "name", "must name a registered task")
        self.require(self.eval_size >= 1, "eval_size", "must be >= 1")
        if isinstance(self.reward, str):
            self.reward = [self.reward] if self.reward.strip() else []
        elif isinstance(self.reward, list | tuple):
            self.reward = list(self.reward)
        self.require(isinstance(self.reward, list) and all(isinstance(r, str) and r.count(":") >= 1 and
                                                           r.rsplit(":", 1)[1] for r in self.reward),
                     "reward", 'must be "module:function" or "file.py:function", or a list of them')
        self.require(not self.reward_weights or len(self.reward_weights) == len(self.reward), "reward_weights",
                     f"must have one weight per task.reward function ({len(self.reward)})")
