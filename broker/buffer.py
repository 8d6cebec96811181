"""The broker's rollout buffer: de-duplicated, grouped, bounded, stale-aware, optionally journaled.

Rules:
- A rollout is stored at most once: its id is remembered while it is buffered and, after it is
  consumed, in a window of `dedup_window` ids. A duplicate is acked again but not stored.
- Batches hold whole groups only: a group is servable once `group_size` distinct rollouts of its
  `group_id` are present. Groups are served oldest-complete first.
- Staleness: when a learner at version `s` with `max_lag` asks for a batch, every buffered group
  with a rollout whose oldest token version is below `s - max_lag` is dropped whole and counted.
- Stale on arrival (weights.mode=stop_the_world): `discard_stale` acks rollouts that are already too
  old without buffering them; they count as stored and as dropped stale, and their ids are
  remembered like consumed ones, so `stored_total == consumed_total + dropped_stale_total + depth`.
- Capacity: a rollout of a new group is refused while `depth >= capacity` (the actor keeps it and
  resends). Members of a group already present are admitted past capacity, so a full buffer of
  half-finished groups can never deadlock; the overshoot is at most one group per open group.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tether.broker.journal import DONE, PUT, SEEN, Journal
from tether.common.messages import Rollout

# How many recently consumed ids survive a journal compaction (per unit of capacity).
_SEEN_KEPT_PER_CAPACITY = 8


@dataclass
class AddResult:
    stored: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def acked(self) -> list[str]:
        return self.stored + self.duplicates


class RolloutBuffer:
    def __init__(self, capacity: int, *, dedup_window: int = 1_000_000, journal: Journal | None = None) -> None:
        self.capacity = capacity
        self.dedup_window = dedup_window
        self.journal = journal
        self._groups: OrderedDict[str, dict[str, Rollout]] = OrderedDict()
        self._complete: OrderedDict[str, None] = OrderedDict()
        self._index: dict[str, str] = {}  # rollout id -> group id, for buffered rollouts
        self._consumed: OrderedDict[str, None] = OrderedDict()
        self.stored_total = 0
        self.consumed_total = 0
        self.dropped_stale_total = 0
        self.duplicates_total = 0
        self.refused_total = 0

    # ---- queries

    @property
    def depth(self) -> int:
        return len(self._index)

    @property
    def ready(self) -> int:
        """Rollouts in complete groups (what a learner could be served now)."""
        return sum(len(self._groups[g]) for g in self._complete)

    def seen(self, rollout_id: str) -> bool:
        return rollout_id in self._index or rollout_id in self._consumed

    # ---- mutation

    def add(self, rollouts: list[Rollout]) -> AddResult:
        """Store what fits; journal it before returning so the caller may ack `result.acked`."""
        result = AddResult()
        new: list[Rollout] = []
        for rollout in rollouts:
            rid = rollout.rollout_id
            if self.seen(rid) or any(r.rollout_id == rid for r in new):
                result.duplicates.append(rid)
                continue
            if self.depth >= self.capacity and rollout.group_id not in self._groups:
                result.refused.append(rid)
                continue
            self._insert(rollout)
            new.append(rollout)
            result.stored.append(rid)
        if self.journal is not None and new:
            self.journal.put(new)
        self.stored_total += len(result.stored)
        self.duplicates_total += len(result.duplicates)
        self.refused_total += len(result.refused)
        return result

    def _insert(self, rollout: Rollout) -> None:
        group = self._groups.setdefault(rollout.group_id, {})
        group[rollout.rollout_id] = rollout
        self._index[rollout.rollout_id] = rollout.group_id
        first = next(iter(group.values()))
        if len(group) >= first.group_size and rollout.group_id not in self._complete:
            self._complete[rollout.group_id] = None

    def _remove_group(self, group_id: str) -> list[str]:
        group = self._groups.pop(group_id, {})
        self._complete.pop(group_id, None)
        for rid in group:
            self._index.pop(rid, None)
            self._remember_consumed(rid)
        return list(group)

    def _remember_consumed(self, rid: str) -> None:
        if self.dedup_window <= 0:
            return
        self._consumed[rid] = None
        while len(self._consumed) > self.dedup_window:
            self._consumed.popitem(last=False)

    def drop_stale(self, min_version: int) -> int:
        """Drop every group holding a rollout whose oldest token version is below `min_version`."""
        if min_version <= 0:
            return 0
        stale = [
            gid for gid, group in self._groups.items()
            if any(0 <= r.min_version < min_version for r in group.values())
        ]
        dropped: list[str] = []
        for gid in stale:
            dropped.extend(self._remove_group(gid))
        if self.journal is not None:
            self.journal.done(dropped)
        self.dropped_stale_total += len(dropped)
        return len(dropped)

    def discard_stale(self, rollouts: list[Rollout]) -> AddResult:
        """Ack `rollouts` as stored-then-dropped-stale without buffering them (duplicates: acked again).

        Used when a rollout is stale the moment it arrives. Counting it as stored and dropped (rather
        than not at all) keeps the books balanced and the drop visible; remembering its id makes a
        resend a duplicate, and the journal's DONE record keeps that true across a broker restart.
        """
        result = AddResult()
        for rollout in rollouts:
            rid = rollout.rollout_id
            if self.seen(rid) or rid in result.stored:
                result.duplicates.append(rid)
                continue
            self._remember_consumed(rid)
            result.stored.append(rid)
        if self.journal is not None and result.stored:
            self.journal.done(result.stored)
        self.stored_total += len(result.stored)
        self.dropped_stale_total += len(result.stored)
        self.duplicates_total += len(result.duplicates)
        return result

    def has_group(self, group_id: str) -> bool:
        """Whether some rollout of `group_id` is buffered now."""
        return group_id in self._groups

    def is_complete(self, group_id: str) -> bool:
        """Whether `group_id` is buffered with all its members (servable)."""
        return group_id in self._complete

    def drop_group(self, group_id: str) -> int:
        """Drop one buffered group as stale (counted, journaled); returns the rollouts dropped."""
        dropped = self._remove_group(group_id)
        if self.journal is not None and dropped:
            self.journal.done(dropped)
        self.dropped_stale_total += len(dropped)
        return len(dropped)

    def take(self, size: int) -> list[Rollout] | None:
        """Whole complete groups totalling `size` rollouts (or one oversize group); None if not yet."""
        chosen: list[str] = []
        total = 0
        for gid in self._complete:
            n = len(self._groups[gid])
            if total + n > size:
                if not chosen:
                    chosen.append(gid)  # a group larger than the request is served alone
                    total = n
                break
            chosen.append(gid)
            total += n
            if total == size:
                break
        if total < size:
            return None
        batch: list[Rollout] = []
        for gid in chosen:
            batch.extend(self._groups[gid].values())
            self._remove_group(gid)
        self.consumed_total += len(batch)
        if self.journal is not None:
            self.journal.done([r.rollout_id for r in batch])
            self._maybe_compact()
        return batch

    # ---- journal

    def replay_journal(self) -> int:
        """Rebuild the buffer from the journal, then compact it. Returns rollouts restored."""
        if self.journal is None:
            return 0
        for kind, value in self.journal.replay():
            if kind == PUT:
                assert isinstance(value, Rollout)
                if not self.seen(value.rollout_id):
                    self._insert(value)
            elif kind in (DONE, SEEN):
                assert isinstance(value, list)
                for rid in value:
                    gid = self._index.pop(rid, None)
                    if gid is not None:
                        group = self._groups.get(gid, {})
                        group.pop(rid, None)
                        if not group:
                            self._groups.pop(gid, None)
                            self._complete.pop(gid, None)
                    self._remember_consumed(rid)
        self._compact()
        return self.depth

    def _maybe_compact(self) -> None:
        assert self.journal is not None
        if self.journal.done_since_compaction >= 4 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        assert self.journal is not None
        keep = _SEEN_KEPT_PER_CAPACITY * self.capacity
        seen = list(self._consumed)[-keep:]
        live = [r for group in self._groups.values() for r in group.values()]
        self.journal.rewrite(seen, live)
