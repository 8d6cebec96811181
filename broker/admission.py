"""Admission by version: actors start a group only when its rollouts can still be trained on.

Actors ask before starting groups (GenerationRequest); the broker grants a group only if, queued
behind everything already buffered or granted, it would reach the learner within `max_lag`:

    outstanding = buffered rollouts + granted groups not yet delivered x group_size
    consumed at learner version  next_step + outstanding // rollouts_per_step
    lag                        = that - the actor's version   must be <= max_lag

where `next_step` is the learner's version for the next batch it has not been served yet. While
fewer than one step's rollouts are outstanding a grant is always possible (the learner must never
starve) unless the actor is already more than `max_lag` behind the learner's version now: whatever
it generated would be dropped as stale, so it waits for its update. Outstanding rollouts never
exceed the buffer's capacity. So the learner's pace sets the
actors' pace: a slow learner makes actors wait instead of generating rollouts that would be
dropped as stale, and a learner that stops (or restarts) stops generation.

weights.mode=stop_the_world is the strict case: grants only to actors holding the latest
version, at most one step's worth of groups per version, so every step trains on lag-0 tokens only
and actors idle while the learner steps.

A request is answered as soon as at least one group can be granted; the rest of it stays parked and
is granted as room frees up (a batch leased, a version loaded, an
actor gone); a new request from the same actor replaces what is parked. Grants of an actor that dies or registers again are released.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tether.common.messages import GenerationGrant, GenerationRequest


@dataclass(frozen=True)
class AdmissionPolicy:
    mode: str
    """inflight or stop_the_world (weights.mode)."""
    rollouts_per_step: int
    group_size: int
    max_lag: int
    capacity: int

    @property
    def groups_per_step(self) -> int:
        return max(1, self.rollouts_per_step // self.group_size)


@dataclass
class Parked:
    identity: bytes
    msg_id: str
    request: GenerationRequest


@dataclass(frozen=True)
class Grant:
    actor_id: str
    identity: bytes
    msg_id: str
    record: GenerationGrant


class Admission:
    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.granted: dict[str, int] = {}
        """Actor id -> groups granted and not yet delivered."""
        self.parked: dict[str, Parked] = {}
        self._version_grants: tuple[int, int] = (-1, 0)  # stop_the_world: (version, groups granted at it)
        self._turn = 0

    @property
    def granted_groups(self) -> int:
        return sum(self.granted.values())

    def request(self, actor_id: str, identity: bytes, msg_id: str, req: GenerationRequest) -> None:
        self.parked[actor_id] = Parked(identity, msg_id, req)

    def delivered(self, actor_id: str) -> None:
        """The first rollout of a new group from `actor_id` arrived: one grant is used up."""
        if self.granted.get(actor_id, 0) > 0:
            self.granted[actor_id] -= 1

    def forget(self, actor_id: str) -> None:
        """The actor died or registered again: release its grants and its parked request."""
        released = self.granted.pop(actor_id, 0)
        self.parked.pop(actor_id, None)
        version, count = self._version_grants
        self._version_grants = (version, max(0, count - released))

    def serve(self, *, buffered: int, next_step: int, latest_version: int,
              actor_version: Callable[[str], int | None], max_version: int | None = None,
              learner_version: int | None = None) -> list[Grant]:
        """Grant what the rules allow to parked requests, taking turns between actors.

        `max_version`: no actor holds a version above it (None: unknown). The broker serves after
        every message; while the learner is behind, nobody can be granted anything, and this bound
        says so without asking every parked actor for its version. `learner_version`: the learner's
        version now (None: `next_step`); a group that would be stale even if trained on right now
        is never granted.
        """
        policy = self.policy
        if self._version_grants[0] != latest_version:
            self._version_grants = (latest_version, 0)
        if not self.parked:
            return []
        outstanding = buffered + self.granted_groups * policy.group_size
        now = next_step if learner_version is None else learner_version
        if not self._may_admit(outstanding, next_step, now, latest_version, max_version):
            self._turn %= len(self.parked)  # as the loop below does: the next turn starts where it would have
            return []
        grants: list[Grant] = []
        order = sorted(self.parked)
        if order:
            self._turn %= len(order)
            order = order[self._turn:] + order[:self._turn]
        for actor_id in order:
            version = actor_version(actor_id)
            if version is None:
                continue  # holds no weights of the current lineage: nothing it makes is usable
            parked = self.parked[actor_id]
            n = 0
            while n < parked.request.groups and self._admits(outstanding, next_step, now, latest_version, version):
                n += 1
                outstanding += policy.group_size
                if policy.mode == "stop_the_world":
                    self._version_grants = (latest_version, self._version_grants[1] + 1)
            if n:
                remaining = parked.request.groups - n
                if remaining:  # stays parked: the rest is granted as room frees up
                    self.parked[actor_id] = Parked(parked.identity, parked.msg_id,
                                                   GenerationRequest(seq=parked.request.seq, groups=remaining))
                else:
                    del self.parked[actor_id]
                self.granted[actor_id] = self.granted.get(actor_id, 0) + n
                grants.append(Grant(actor_id, parked.identity, parked.msg_id,
                                    GenerationGrant(seq=parked.request.seq, groups=n, version=version)))
        if grants:
            self._turn += 1
        return grants

    def _may_admit(self, outstanding: int, next_step: int, now: int, latest_version: int,
                   max_version: int | None) -> bool:
        """False only when `_admits` is false for every version up to `max_version` (any version
        when the reason does not depend on it): versions only help, a newer one never hurts."""
        policy = self.policy
        if outstanding + policy.group_size > max(policy.capacity, policy.group_size):
            return False
        if policy.mode == "stop_the_world":
            return self._version_grants[1] < policy.groups_per_step
        if max_version is None:
            return True
        return self._admits(outstanding, next_step, now, latest_version, max_version)

    def _admits(self, outstanding: int, next_step: int, now: int, latest_version: int, version: int) -> bool:
        policy = self.policy
        if outstanding + policy.group_size > max(policy.capacity, policy.group_size):
            return False
        if policy.mode == "stop_the_world":
            return version == latest_version and self._version_grants[1] < policy.groups_per_step
        if outstanding < policy.rollouts_per_step:
            # Never starve the learner, but never for nothing: a group that would be stale even if
            # trained on right now waits for its actor's update instead of being generated and dropped.
            return now - version <= policy.max_lag
        consumed_at = next_step + outstanding // policy.rollouts_per_step
        return consumed_at - version <= policy.max_lag
