"""Tasks: a prompt source plus a reward, registered by name.

    task = build_task(TaskConfig(name="arithmetic", options={"max_operand": "99"}))
    prompt = next(task.train_prompts(seed=0))
    task.scorer.score([prompt], ["46"]).rewards     # task.reward functions, or the task's own reward

Built in: arithmetic (the tiny model's toy task), jsonl (GSM8K-style rows), dataset (local files
through the `datasets` library, scored by TRL-style reward functions; tether.actor.rewards).
"""

from tether.actor.tasks.base import Prompt, Task
from tether.actor.tasks.registry import build_task, register_task, task_names

__all__ = ["Prompt", "Task", "build_task", "register_task", "task_names"]
