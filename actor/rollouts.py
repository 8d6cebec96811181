"""Rollout groups: n completions per prompt, scored by the reward functions, packed as wire Rollouts.

Bounded work in flight: `RolloutPump` starts at most `max_groups_in_flight` groups at once and waits
for the sink's capacity (unacked rollouts below the limit) before starting a group, so a slow broker
or learner slows generation instead of growing memory.

With weights.mode=stop_the_world a `StopTheWorldGate` also decides when a group may start: only
while the loaded version still has room in the broker's per-version quota, so the actor idles while
the learner steps and resumes once the next version is loaded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
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
    """Where rollouts go (BrokerClient implements it): kept until acked, with a bounded unacked count."""

    def send_rollouts(self, rollouts: list[Rollout]) -> None: ...

    def wait_for_capacity(self, n: int = 1, timeout: float = 10.0) -> bool: ...

    def unacked_count(self) -> int: ...


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
        scored = await asyncio.get_running_loop().run_in_executor(
            self._reward_thread, self.scorer.score, [prompt] * len(completions), [c.text for c in completions],
            [list(c.token_ids) for c in completions])
        return [
            to_rollout(c, group_id=group_id, group_size=self.sampling.group_size, actor_id=self.actor_id,
                       task=self.task.name or "task", reward=reward, sampling=self.sampling, seed=seed)
            for c, seed, reward in zip(completions, seeds, scored.rewards, strict=True)
        ]


class StopTheWorldGate:
    """weights.mode=stop_the_world: may the pump start a group now, at the loaded weight version `v`?

    - Never once the broker's quota for `v` is full (an Ack said fewer than `group_size` left), nor
      when the broker already counts a newer version: those tokens would arrive stale.
    - At most `rollouts_per_step / group_size` groups per version from this actor: what one step
      consumes, so a single actor fills the quota exactly and generates nothing that is thrown away.
      Past that local cap it starts more only if the broker reports room at `v` while nothing of
      this actor is in flight or unacked (rollouts were lost, or another actor fell short), so a
      short quota can never deadlock the run.
    - A newer loaded version starts afresh: the actor resumes by itself after the update.

    The inputs are callables so tests can drive them: `version` (the engine's loaded version),
    `quota` (the client's latest `(version, left)` or None) and `unacked` (rollouts not yet acked).
    """

    def __init__(self, *, version: Callable[[], int], quota: Callable[[], tuple[int, int] | None],
                 unacked: Callable[[], int], rollouts_per_step: int, group_size: int, poll_s: float = 0.05):
        self._version, self._quota, self._unacked = version, quota, unacked
        self.group_size = group_size
        self.groups_per_version = max(1, rollouts_per_step // group_size)
        self.poll_s = poll_s
        self.started: Counter[int] = Counter()
        """Groups started per loaded version."""
        self.waits = 0
        """Times the gate made the pump wait (idle) for the next version."""

    def may_start(self, in_flight: int) -> bool:
        v = self._version()
        quota = self._quota()
        if quota is not None:
            quota_version, left = quota
            if quota_version > v:
                return False  # the broker has moved on; wait until the new weights are loaded
            if quota_version == v and left < self.group_size:
                return False
            if (quota_version == v and self.started[v] >= self.groups_per_version
                    and in_flight == 0 and self._unacked() == 0):
                return True  # room left although our share was delivered: fill it
        return self.started[v] < self.groups_per_version

    async def wait_to_start(self, in_flight: Callable[[], int]) -> int:
        """Wait until a group may start, record it, and return the version it is counted against."""
        waited = False
        while not self.may_start(in_flight()):
            if not waited:
                waited = True
                self.waits += 1
                log.info("stop_the_world_waiting", version=self._version(), quota=self._quota())
            await asyncio.sleep(self.poll_s)
        v = self._version()
        if waited:
            log.info("stop_the_world_resumed", version=v)
        self.started[v] += 1
        return v


class RolloutPump:
    """Keeps up to `max_groups_in_flight` groups generating and hands finished groups to the sink.

    With a `gate` (stop_the_world), a group starts only when the gate allows it.
    """

    def __init__(self, generator: GroupGenerator, sink: RolloutSink, max_groups_in_flight: int,
                 capacity_poll_s: float = 0.5, gate: StopTheWorldGate | None = None):
        self.generator, self.sink = generator, sink
        self.gate = gate
        self.max_groups_in_flight = max_groups_in_flight
        self.capacity_poll_s = capacity_poll_s
        self.groups_done = 0
        self.rollouts_sent = 0
        self.in_flight = 0

    async def _send(self, rollouts: list[Rollout]) -> None:
        from tether.common.peer import Backpressure

        while True:
            try:
                await asyncio.to_thread(self.sink.send_rollouts, rollouts)
                return
            except Backpressure:
                await asyncio.to_thread(self.sink.wait_for_capacity, len(rollouts), self.capacity_poll_s)

    async def run(self, prompts: Iterator[Prompt], max_groups: int | None = None) -> None:
        """Generate groups from `prompts` until exhausted or `max_groups` are sent."""
        slots = asyncio.Semaphore(self.max_groups_in_flight)
        group_size = self.generator.sampling.group_size
        pending: set[asyncio.Task] = set()
        started = 0

        async def one(prompt: Prompt) -> None:
            try:
                rollouts = await self.generator.generate(prompt)
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
            # Backpressure: do not start generating what the sink could not take now.
            while not await asyncio.to_thread(self.sink.wait_for_capacity,
                                              group_size * (self.in_flight + 1), self.capacity_poll_s):
                pass
            if self.gate is not None:
                await self.gate.wait_to_start(lambda: self.in_flight)
            self.in_flight += 1
            started += 1
            task = asyncio.ensure_future(one(prompt))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
