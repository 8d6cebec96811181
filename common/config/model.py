"""Model and task configuration, shared by actor and learner."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Data file for file-backed tasks (jsonl)."""
    eval_size: int = 200
    """Held-out prompts used for greedy accuracy."""
    seed: int = 0
    """Seed of the task's prompt order and train/eval split."""
    options: dict[str, str] = field(default_factory=dict)
    """Task-specific options, e.g. {max_operand: "99"} for arithmetic."""

    def __post_init__(self) -> None:
        self.require(bool(self.name), "name", "must name a registered task")
        self.require(self.eval_size >= 1, "eval_size", "must be >= 1")
