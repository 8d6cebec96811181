"""The broker's rollout buffer: rollouts grouped by prompt, served as whole groups, oldest first.

A pure in-memory structure; the ledger (broker/ledger.py) decides what enters and leaves it and
journals every change.

- A group is complete (servable) once `group_size` distinct rollouts of its `group_id` are in.
  Complete groups are served in the order they completed.
- Capacity: a rollout of a new group is refused while `depth >= capacity`; members of a group
  already present are admitted past capacity, so half-finished groups can never deadlock the
  buffer (the overshoot is at most one group per open group).
- `oldest_version()` answers "could anything buffered be stale?" without a scan: the broker asks
  it before every batch it serves, and a scan per message was most of its work under load.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from tether.common.messages import Rollout


@dataclass
class GroupInfo:
    actor_id: str
    group_size: int
    last_arrival: float


class RolloutBuffer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._groups: OrderedDict[str, dict[str, Rollout]] = OrderedDict()
        self._info: dict[str, GroupInfo] = {}
        self._complete: OrderedDict[str, None] = OrderedDict()
        self._index: dict[str, str] = {}  # rollout id -> group id
        self._ready = 0  # rollouts in complete groups
        # Buffered rollouts by their oldest token's version (empty completions, -1, left out).
        self._min_versions: Counter[int] = Counter()

    # ---- queries

    @property
    def depth(self) -> int:
        return len(self._index)

    @property
    def ready(self) -> int:
        """Rollouts in complete groups (what a learner could be served now)."""
        return self._ready

    def __contains__(self, rollout_id: str) -> bool:
        return rollout_id in self._index

    def oldest_version(self) -> int | None:
        """The oldest token version of any buffered rollout (None: none buffered holds a token).

        Staleness only grows as versions age, so when this is not stale nothing buffered is.
        """
        return min(self._min_versions, default=None)

    def has_group(self, group_id: str) -> bool:
        return group_id in self._groups

    def admits(self, rollout: Rollout) -> bool:
        """Whether `rollout` fits: its group is already here, or there is room for a new group."""
        return rollout.group_id in self._groups or self.depth < self.capacity

    def rollouts(self) -> Iterable[Rollout]:
        for group in self._groups.values():
            yield from group.values()

    # ---- mutation

    def insert(self, rollout: Rollout, now: float) -> None:
        gid, rid = rollout.group_id, rollout.rollout_id
        group = self._groups.get(gid)
        if group is None:
            group = self._groups[gid] = {}
        replaced = group.get(rid)
        if replaced is not None:
            self._uncount(replaced)
        group[rid] = rollout
        self._index[rid] = gid
        self._count(rollout)
        info = self._info.get(gid)
        if info is None:
            info = self._info[gid] = GroupInfo(rollout.actor_id, rollout.group_size, now)
        else:
            info.last_arrival = now
        if gid in self._complete:
            if replaced is None:
                self._ready += 1
        elif len(group) >= info.group_size:
            self._complete[gid] = None
            self._ready += len(group)

    def insert_group_first(self, rollouts: list[Rollout], now: float) -> None:
        """Put a whole group back at the head of the queue (a lease taken back from a learner that
        ended: its rollouts are older than anything buffered and are served first)."""
        for rollout in rollouts:
            self.insert(rollout, now)
        if rollouts:
            gid = rollouts[0].group_id
            self._groups.move_to_end(gid, last=False)
            if gid in self._complete:
                self._complete.move_to_end(gid, last=False)

    def remove_group(self, group_id: str) -> list[Rollout]:
        group = self._groups.pop(group_id, {})
        self._info.pop(group_id, None)
        if group_id in self._complete:
            del self._complete[group_id]
            self._ready -= len(group)
        for rid, rollout in group.items():
            self._index.pop(rid, None)
            self._uncount(rollout)
        return list(group.values())

    def remove(self, rollout_id: str) -> Rollout | None:
        """Remove one rollout (journal replay of a lease or drop that names it)."""
        gid = self._index.pop(rollout_id, None)
        if gid is None:
            return None
        group = self._groups[gid]
        rollout = group.pop(rollout_id)
        self._uncount(rollout)
        if gid in self._complete:
            self._ready -= 1
        if not group:
            self.remove_group(gid)
        return rollout

    def take(self, size: int) -> list[Rollout] | None:
        """Whole complete groups totalling `size` rollouts (or one oversize group); None if not yet."""
        if self._ready < size:
            return None  # (an oversize group alone would make `ready` exceed size)
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
        return [r for gid in chosen for r in self.remove_group(gid)]

    def _count(self, rollout: Rollout) -> None:
        data = rollout.versions.data  # min_version, inline: this runs for every rollout stored
        if data:
            self._min_versions[int.from_bytes(data[:4], "little", signed=True)] += 1

    def _uncount(self, rollout: Rollout) -> None:
        version = rollout.min_version
        if version >= 0:
            self._min_versions[version] -= 1
            if not self._min_versions[version]:
                del self._min_versions[version]

    # ---- selections (the ledger drops what these name)

    def groups_where(self, predicate) -> list[str]:
        """Group ids holding at least one rollout for which `predicate(rollout)` is true."""
        return [gid for gid, group in self._groups.items() if any(predicate(r) for r in group.values())]

    def orphaned_groups(self, idle_before: float, live_actors: set[str]) -> list[str]:
        """Incomplete groups of actors not in `live_actors` whose last member arrived before
        `idle_before`: nobody will ever complete them."""
        return [
            gid for gid, info in self._info.items()
            if gid not in self._complete and info.last_arrival < idle_before and info.actor_id not in live_actors
        ]
