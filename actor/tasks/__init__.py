"""Tasks: a prompt source plus a reward function, registered by name.

    task = build_task(TaskConfig(name="arithmetic", options={"max_operand": "99"}))
    prompt = next(task.train_prompts(seed=0))
    task.reward(prompt, "46")
"""

from tether.actor.tasks.base import Prompt, Task
from tether.actor.tasks.registry import build_task, register_task, task_names

__all__ = ["Prompt", "Task", "build_task", "register_task", "task_names"]
