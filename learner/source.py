"""Where a learner rank's rollouts come from: the BatchSource protocol and its implementations.

- BrokerBatchSource: the real one, pulls each rank's share from the broker (tether.common.peer).
- InMemoryBatchSource / FileBatchSource: a fixed list of rollouts served deterministically by step,
  for tests, benchmarks and offline runs. A step's batch depends only on the step number, so a
  resumed run sees exactly the batch the uninterrupted run would have seen.

Contract: every rank receives whole groups, and `RolloutBatch.dropped_stale` counts what the source
already dropped for staleness (the learner adds its own drops).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from tether.common.logging import get_logger
from tether.common.messages import Rollout, RolloutBatch

log = get_logger(__name__)


class BatchSource(Protocol):
    def next_batch(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> RolloutBatch:
        """This rank's share of the `size` rollouts of optimizer step `step` (0-based)."""
        ...


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

    def next_batch(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> RolloutBatch:
        group_size = len(self._groups[0])
        if size % group_size:
            raise ValueError(f"batch size {size} is not a multiple of the group size {group_size}")
        per_step = size // group_size
        n = len(self._groups)
        chosen = [self._groups[(step * per_step + i) % n] for i in range(per_step)]
        mine = [r for i, group in enumerate(chosen) if i % world_size == rank for r in group]
        return RolloutBatch(rollouts=mine)


_BATCH_ENCODER = msgspec.msgpack.Encoder()
_BATCH_DECODER = msgspec.msgpack.Decoder(RolloutBatch)


def save_rollouts(path: str | Path, rollouts: Sequence[Rollout]) -> None:
    """Write rollouts as one msgpack-encoded RolloutBatch (the wire record)."""
    Path(path).write_bytes(_BATCH_ENCODER.encode(RolloutBatch(rollouts=list(rollouts))))


def load_rollouts(path: str | Path) -> list[Rollout]:
    return list(_BATCH_DECODER.decode(Path(path).read_bytes()).rollouts)


class FileBatchSource(InMemoryBatchSource):
    """InMemoryBatchSource over the rollouts saved at `path` by save_rollouts."""

    def __init__(self, path: str | Path):
        super().__init__(load_rollouts(path))


class BrokerBatchSource:
    """Pulls each rank's share from the broker through tether.common.peer.BrokerClient.

    Thin on purpose: the broker owns buffering, staleness drops before delivery and whole groups;
    it reports its drops in RolloutBatch.dropped_stale. A step's groups are dealt to the ranks as
    evenly as whole groups allow.
    """

    def __init__(self, client, group_size: int, timeout_s: float = 30.0):
        self._client = client
        self._group_size = group_size
        self._timeout_s = timeout_s

    def next_batch(self, step: int, rank: int, world_size: int, size: int, learner_version: int, max_lag: int) -> RolloutBatch:
        groups = size // self._group_size
        mine = (groups // world_size + (1 if rank < groups % world_size else 0)) * self._group_size
        if mine == 0:
            return RolloutBatch(rollouts=[])
        while True:
            batch = self._client.request_batch(rank=rank, size=mine, learner_version=learner_version,
                                               max_lag=max_lag, timeout=self._timeout_s)
            if batch is not None:
                return batch
            log.info("waiting for rollouts", rank=rank, size=mine, learner_version=learner_version)
