"""The learning rate of each optimizer step: linear warm-up, then constant, linear or cosine decay.

A pure function of the step index, so a learner resumed from a checkpoint at version v continues
the schedule exactly where the run left it (the version is the number of steps taken) with nothing
but the version to restore.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def learning_rate(step: int, *, lr: float, steps: int, schedule: str = "constant", warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    """The learning rate of the optimizer step taking version `step` to `step + 1` (0-based).

    Warm-up: lr * (step + 1) / warmup_steps for the first `warmup_steps` steps. Then `constant` keeps
    lr; `linear` and `cosine` decay from lr to lr * min_lr_ratio, reached at the last step
    (`steps - 1`), linearly or along half a cosine.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = steps - warmup_steps - 1
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
