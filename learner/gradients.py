"""The gradient norm of a step, and clipping to learner.grad_clip."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients before clipping; scales them down to `max_norm` if above it.

    `max_norm` 0 disables clipping: torch's clip_grad_norm_(..., 0) would multiply every gradient
    by 0, so it is never called with 0. A norm that is not finite (inf or NaN) leaves the gradients
    untouched: the caller must not apply them. With FSDP2 the gradients are DTensor shards and the
    norm is reduced over the ranks, so every rank gets the same value and takes the same decision.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    if max_norm > 0 and math.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return norm
