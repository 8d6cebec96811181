"""Where a learner rank's rollouts come from: the BatchSource protocol and its implementations.

- BrokerBatchSource: the real one, leases each rank's share from the broker (learner/broker_link.py).
- InMemoryBatchSource / FileBatchSource: a fixed list of rollouts served deterministically by step,
  for tests, benchmarks and offline runs. A step's batch depends only on the step number, so a
  resumed run sees exactly the batch the uninterrupted run would have seen.

Contract: `request()` asks for a step's share, `poll()` returns it once there (the learner polls
in short slices, so it can serve publish requests while it waits); every rank receives whole
groups, and `RolloutBatch.dropped_stale` counts what the source already dropped for staleness (the
learner adds its own drops).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from tether.common.messages import Rollout, RolloutBatch


class BatchSource(Protocol):
    def request(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> None:
        """Ask for this rank's share of the `size` rollouts of optimizer step `step` (0-based)."""
        ...

    def poll(self, timeout: float) -> RolloutBatch | None:
        """The requested share once it is there (waiting up to `timeout` seconds), else None."""
        ...


def share_of(groups: int, rank: int, world_size: int) -> int:
    """Whole groups of a step for `rank`: as even as whole groups allow, lower ranks first."""
    return groups // world_size + (1 if rank < groups % world_size else 0)


def _groups(rollouts: Sequence[Rollout]) -> list[list[Rollout]]:
    groups: dict[str, list[Rollout]] = {}
    for rollout in rollouts:
        groups.setdefault(rollout.group_id, []).append(rollout)
    return list(groups.values())


class InMemoryBatchSource:
    """Serves a fixed rollout list: step s takes the next `size` rollouts (cycling), groups whole,
    and deals the groups round-robin to the ranks."""

    def __init__(self, rollouts: Sequence[Rollout]):
        self._groups = _groups(rollouts)
        if not self._groups:
            raise ValueError("InMemoryBatchSource needs at least one rollout")

        self._requested: RolloutBatch | None = None

    def request(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> None:
        self._requested = self.next_batch(step, rank, world_size, size, learner_version, max_lag)

    def poll(self, timeout: float) -> RolloutBatch | None:
        batch, self._requested = self._requested, None
        return batch

    def next_batch(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> RolloutBatch:
        """The deterministic share of `rank` at `step` (the same for the same step, on every run)."""
        group_size = len(self._groups[0])
        if size % group_size:
            raise ValueError(f"batch size {size} is not a multiple of the group size {group_size}")
        per_step = size // group_size
        n = len(self._groups)
        chosen = [self._groups[(step * per_step + i) % n] for i in range(per_step)]
        mine = [r for i, group in enumerate(chosen) if i % world_size == rank for r in group]
        return RolloutBatch(seq=step, learner_version=learner_version, rollouts=mine)


_BATCH_ENCODER = msgspec.msgpack.Encoder()
_BATCH_DECODER = msgspec.msgpack.Decoder(RolloutBatch)


def save_rollouts(path: str | Path, rollouts: Sequence[Rollout]) -> None:
    """Write rollouts as one msgpack-encoded RolloutBatch (the wire record)."""
    Path(path).write_bytes(_BATCH_ENCODER.encode(RolloutBatch(seq=0, learner_version=0, rollouts=list(rollouts))))


def load_rollouts(path: str | Path) -> list[Rollout]:
    return list(_BATCH_DECODER.decode(Path(path).read_bytes()).rollouts)


class FileBatchSource(InMemoryBatchSource):
    """InMemoryBatchSource over the rollouts saved at `path` by save_rollouts."""

    def __init__(self, path: str | Path):
        super().__init__(load_rollouts(path))


class BrokerBatchSource:
    """Leases each rank's share from the broker through a LearnerLink.

    Thin on purpose: the broker owns buffering, staleness drops before delivery and whole groups;
    it reports its drops in RolloutBatch.dropped_stale. A step's groups are dealt to the ranks as
    evenly as whole groups allow.
    """

    def __init__(self, link, group_size: int):
        self._link = link
        self._group_size = group_size
        self._empty = False

    def request(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> None:
        mine = share_of(size // self._group_size, rank, world_size) * self._group_size
        self._empty = mine == 0
        if not self._empty:
            self._link.request_batch(size=mine, learner_version=learner_version, max_lag=max_lag)

    def poll(self, timeout: float) -> RolloutBatch | None:
        if self._empty:
            return RolloutBatch(seq=0, learner_version=0, rollouts=[])
        return self._link.poll_batch(timeout)
