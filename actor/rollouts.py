"""Rollout groups: n completions per prompt, scored by the reward functions, packed as wire Rollouts.

Bounded work in flight: `RolloutPump` starts at most `max_groups_in_flight` groups at once, and each
group only with a generation grant from the broker (admission by version: a grant means the group
can still be trained on when it arrives; in weights.mode=stop_the_world, grants come only for the
current version, one step's worth). So the learner's pace sets the actors' pace, and nothing is
generated to be dropped as stale. The sink's unacked limit bounds memory when the broker is away.

When the learner resumes from an older checkpoint, versions above its fork point name abandoned
weights: `void_above()` makes the pump discard groups started before that with such tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from tether.actor.chat import encode_prompt
from tether.actor.engine import ActorEngine, Completion
from tether.actor.rewards import RewardScorer
from tether.actor.tasks import Prompt, Task
from tether.common.config import SamplingConfig
from tether.common.logging import get_logger
from tether.common.messages import Array, Rollout, SamplingSpec

log = get_logger(__name__)


class RolloutSink(Protocol):
    """Where rollouts go (ActorLink implements it): kept until acked, started only when granted."""

    def send_rollouts(self, rollouts: list[Rollout]) -> None: ...

    def wait_for_capacity(self, n: int = 1, timeout: float = 10.0) -> bool: ...

    def acquire_group(self, wanted: int, timeout: float) -> bool: ...


def actor_seed(seed: int, actor_id: str) -> int:
    """The seed of one actor's prompt order and completion seeds, from a run-wide seed and its id.

    Every actor of a run reads the same config; seeded from it alone, they would draw the same prompts
    in the same order and sample them with the same per-completion seeds, so that two actors holding
    the same weights send identical rollouts and a batch holds each prompt twice (measured in a
    2-actor demo: 13 distinct prompts in a step of 16 groups, a quarter of the completions sent by
    both actors). Mixing in the actor id gives each actor its own stream, and the same one again for
    the same seed and id (reproducible runs).
    """
    digest = hashlib.blake2b(f"{seed}:{actor_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # non-negative, below 2**63


def sampling_params(sampling: SamplingConfig, seed: int):
    """vLLM SamplingParams for one completion; logprobs=0 returns the sampled token's processed logprob."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p,
                          max_tokens=sampling.max_tokens, logprobs=0, seed=seed)


def to_rollout(completion: Completion, *, group_id: str, group_size: int, actor_id: str, task: str,
               reward: float, sampling: SamplingConfig, seed: int) -> Rollout:
    finish = completion.finish_reason if completion.finish_reason in ("stop", "length", "abort") else "stop"
    return Rollout(
        rollout_id=uuid.uuid4().hex, group_id=group_id, group_size=group_size, actor_id=actor_id, task=task,
        prompt_token_ids=Array.from_numpy(np.asarray(completion.prompt_token_ids, dtype=np.int32)),
        completion_token_ids=Array.from_numpy(np.asarray(completion.token_ids, dtype=np.int32)),
        logprobs=Array.from_numpy(np.minimum(completion.logprobs.astype(np.float32), 0.0)),
        versions=Array.from_numpy(completion.versions.astype(np.int32)),
        reward=float(reward),
        sampling=SamplingSpec(temperature=sampling.temperature, max_tokens=sampling.max_tokens,
                              top_k=sampling.top_k, top_p=sampling.top_p, seed=seed),
        finish_reason=finish, created_at=time.time(),
    )


class GroupGenerator:
    """Generates one group (group_size completions of a prompt) and scores it as a batch.

    Scoring runs the reward functions (`scorer`, by default the one `build_task` attached) on one worker
    thread: a slow function does not stall the event loop that streams the engine's outputs, and a
    user's function is never called from two threads at once.
    """

    def __init__(self, engine: ActorEngine, task: Task, tokenizer, sampling: SamplingConfig, actor_id: str,
                 seed: int = 0, scorer: RewardScorer | None = None):
        self.engine, self.task, self.tokenizer = engine, task, tokenizer
        self.sampling, self.actor_id = sampling, actor_id
        self.scorer = scorer or task.scorer or RewardScorer([], task=task)
        self._reward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._seed = seed * 1_000_003  # per-completion seeds: distinct, reproducible for a given actor seed

    def _next_seed(self) -> int:
        self._seed += 1
        return self._seed % (1 << 63)

    async def generate(self, prompt: Prompt) -> list[Rollout]:
        prompt_ids = encode_prompt(prompt, self.tokenizer)
        group_id = f"{self.actor_id}-{uuid.uuid4().hex[:12]}"
        seeds = [self._next_seed() for _ in range(self.sampling.group_size)]
        completions = await asyncio.gather(*[
            self.engine.generate(prompt_ids, sampling_params(self.sampling, seed)) for seed in seeds
        ])
        if any(np.any(np.diff(c.versions) < 0) for c in completions):
            return []  # spans a rewind to an older checkpoint: its first tokens name abandoned weights
        scored = await asyncio.get_running_loop().run_in_executor(
            self._reward_thread, self.scorer.score, [prompt] * len(completions), [c.text for c in completions],
            [list(c.token_ids) for c in completions])
        return [
            to_rollout(c, group_id=group_id, group_size=self.sampling.group_size, actor_id=self.actor_id,
                       task=self.task.name or "task", reward=reward, sampling=self.sampling, seed=seed)
            for c, seed, reward in zip(completions, seeds, scored.rewards, strict=True)
        ]


class RolloutPump:
    """Keeps up to `max_groups_in_flight` granted groups generating and hands finished ones to the sink."""

    def __init__(self, generator: GroupGenerator, sink: RolloutSink, max_groups_in_flight: int,
                 poll_s: float = 0.5):
        self.generator, self.sink = generator, sink
        self.max_groups_in_flight = max_groups_in_flight
        self.poll_s = poll_s
        self.groups_done = 0
        self.rollouts_sent = 0
        self.groups_discarded = 0
        """Groups thrown away because a rewind voided versions they hold."""
        self.in_flight = 0
        self.waits = 0
        """Times the pump had to wait for a generation grant."""
        self._voids: list[tuple[int, int]] = []  # (generation at which it happened, threshold)
        self._generation = 0

    def void_above(self, version: int) -> None:
        """Tokens above `version` now name abandoned weights: discard running groups holding one."""
        self._generation += 1
        self._voids.append((self._generation, version))

    def _voided(self, started_at: int, rollouts: list[Rollout]) -> bool:
        if not rollouts:
            return True
        newest = max(r.max_version for r in rollouts)
        return any(generation > started_at and newest > threshold for generation, threshold in self._voids)

    async def _send(self, rollouts: list[Rollout]) -> None:
        from tether.actor.broker_link import Backpressure

        while True:
            try:
                await asyncio.to_thread(self.sink.send_rollouts, rollouts)
                return
            except Backpressure:
                await asyncio.to_thread(self.sink.wait_for_capacity, len(rollouts), self.poll_s)

    async def run(self, prompts: Iterator[Prompt], max_groups: int | None = None) -> None:
        """Generate groups from `prompts` until exhausted or `max_groups` are sent."""
        slots = asyncio.Semaphore(self.max_groups_in_flight)
        pending: set[asyncio.Task] = set()
        started = 0

        async def one(prompt: Prompt, generation: int) -> None:
            try:
                rollouts = await self.generator.generate(prompt)
                if self._voided(generation, rollouts):
                    self.groups_discarded += 1
                    return
                await self._send(rollouts)
                self.groups_done += 1
                self.rollouts_sent += len(rollouts)
            finally:
                self.in_flight -= 1
                slots.release()

        for prompt in prompts:
            if max_groups is not None and started >= max_groups:
                break
            await slots.acquire()
            waited = False
            while not await asyncio.to_thread(self.sink.acquire_group, self.max_groups_in_flight - self.in_flight,
                                              self.poll_s):
                if not waited:
                    waited = True
                    self.waits += 1
            self.in_flight += 1
            started += 1
            task = asyncio.ensure_future(one(prompt, self._generation))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
