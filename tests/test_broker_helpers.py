"""Shared helpers for the broker tests (not a test module)."""

from __future__ import annotations

import socket

import numpy as np

from tether.common.messages import Rollout, SamplingSpec, float32_array, int32_array


def make_rollout(rollout_id: str, group_id: str = "g0", group_size: int = 1, *, version: int = 0,
                 tokens: int = 4, actor_id: str = "actor-0") -> Rollout:
    return Rollout(
        rollout_id=rollout_id, group_id=group_id, group_size=group_size, actor_id=actor_id, task="arith",
        prompt_token_ids=int32_array([1, 2, 3]),
        completion_token_ids=int32_array(np.arange(tokens) % 250),
        logprobs=float32_array(np.full(tokens, -0.5)),
        versions=int32_array(np.full(tokens, version)),
        reward=1.0, sampling=SamplingSpec(temperature=1.0, max_tokens=max(tokens, 1)), finish_reason="stop",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
