"""The version book: the newest published version, its lineage, and what every actor holds.

A version number counts optimizer steps, so it names weights only within one line of training.
When a learner resumes from a checkpoint at version c while the broker already published versions
above c (the learner died after its last checkpoint), the new training session reuses the numbers
c+1, c+2, ... for different weights. The book therefore records a lineage: the chain of learner
sessions, each with the version it forked from, oldest first:

    [("s1", 0), ("s2", 10), ("s3", 12)]   s2 resumed s1's checkpoint 10; s3 resumed s2's 12

Weights (session, v) are valid in the current lineage if no later session forked below v: (s1, 9)
and (s2, 12) are, (s1, 11) is not. Version 0 is the model on disk and valid everywhere. An actor
holding invalid weights is not ready: its rollouts are refused until it loads the current lineage,
and tokens above the fork point that it generated before are discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VersionBook:
    latest_version: int = 0
    """Newest version the learner published (or resumed at)."""
    lineage: list[tuple[str, int]] = field(default_factory=list)
    learner_version: int = 0
    """The learner's own version (its BatchRequests; ahead of latest_version between publishes)."""
    held: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Actor id -> (lineage session, version) of the weights it holds."""
    max_held: int = -1
    """At least every version in `held` (-1: none): a bound that lets admission skip a scan of
    every actor when even this version could not be granted."""

    @property
    def session(self) -> str:
        return self.lineage[-1][0] if self.lineage else ""

    def valid(self, session: str, version: int) -> bool:
        """Whether weights (session, version) belong to the current lineage."""
        return version <= self.valid_through(session)

    def valid_through(self, session: str) -> int:
        """The newest version of `session` still valid in the current lineage (0 if unknown)."""
        if session == self.session and session:
            return 1 << 62
        sessions = [s for s, _ in self.lineage]
        if session not in sessions:
            return 0
        later = self.lineage[sessions.index(session) + 1 :]
        return min(fork for _, fork in later)

    def actor_version(self, actor_id: str) -> int | None:
        """The version an actor holds if it is valid in the current lineage, else None."""
        held = self.held.get(actor_id)
        if held is None or not self.valid(*held):
            return None
        return held[1]

    def needs_update(self, actor_id: str) -> bool:
        return self.actor_version(actor_id) != self.latest_version

    def record(self, actor_id: str, session: str, version: int) -> None:
        self.held[actor_id] = (session, version)
        self.max_held = max(self.max_held, version)

    def fork(self, session: str, version: int) -> int | None:
        """A new learner session starts at `version`. Returns the rewind threshold (versions above
        it, generated before, are void) when `version` is below what was published, else None."""
        rewind = version if version < self.latest_version else None
        self.lineage.append((session, version))
        self.latest_version = version
        self.learner_version = version
        return rewind
