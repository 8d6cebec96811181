"""Weight updates: who receives a version, in which weight-group epoch, and what happens on failure.

Updates are sequenced: at most one is in flight. The learner (rank 0) drives them with
PublishRequest whenever it holds a version it can broadcast; the broker answers with WeightUpdate
(broadcast now) or PublishDeferred (an update is in flight, or no actor needs the version). When
actors need weights while no update runs (an update failed or finished with actors left behind, an
actor joined, restarted or came back), the broker asks the learner with PublishWanted, repeated
every `nudge_interval_s` until a PublishRequest arrives, so the learner always serves the newest
version it holds, whatever its publish interval.

Epochs: the receivers of an update are the alive, not excluded actors that do not hold the
version. If they (or their incarnations, or the learner's) differ from the previous epoch's, a new
epoch number is taken (numbers never repeat, across broker restarts too: the counter is journaled)
and its rendezvous key carries a fresh random secret, so only members can join its group.

Failure: every member answers with UpdateReport. The update ends when the learner and every
receiver reported, a receiver died, or `update_timeout_s` passed. Receivers that failed or went
silent are re-sent the version in a new epoch; one that misses `max_failures` updates in a row
without the learner failing too is excluded until it registers again (it is the one at fault).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tether.broker.membership import Peer
from tether.broker.versions import VersionBook
from tether.common.logging import get_logger
from tether.common.messages import (
    PublishDeferred,
    PublishRequest,
    PublishWanted,
    Record,
    TensorSpec,
    WeightUpdate,
)

log = get_logger("tether.broker")


@dataclass
class Epoch:
    number: int = 0
    key: tuple | None = None
    group_key: str = ""
    first_ranks: dict[str, int] = field(default_factory=dict)
    world_size: int = 1


@dataclass
class InFlight:
    version: int
    epoch: int
    awaiting: set[str]
    """Receivers that have not reported yet."""
    deadline: float
    learner_reported: bool = False
    learner_ok: bool = True
    failed: set[str] = field(default_factory=set)


Send = Callable[[Peer, Record, str | None], None]
"""How the sequencer sends: (to peer, record, reply-to msg id or None)."""


class WeightUpdates:
    def __init__(self, *, store_host: str, store_port: int, update_timeout_s: float, nudge_interval_s: float,
                 broker_incarnation: str, clock: Callable[[], float], max_failures: int = 3) -> None:
        self.store_host = store_host
        self.store_port = store_port
        self.update_timeout_s = update_timeout_s
        self.nudge_interval_s = nudge_interval_s
        self.broker_incarnation = broker_incarnation
        self.clock = clock
        self.max_failures = max_failures
        self.epoch_counter = 0
        """Newest epoch number handed out; journaled so numbers never repeat."""
        self.epoch = Epoch()
        self.in_flight: InFlight | None = None
        self.excluded: set[str] = set()
        self.failures: Counter[str] = Counter()
        self.tensors: list[TensorSpec] = []
        self.bucket_bytes = 1
        self._last_nudge = float("-inf")
        self._nudge_reason = ""
        self.nudge_idle = False
        """The last `maybe_nudge` had nothing to ask for at any time (an update in flight, no
        learner, or no actor behind): until membership, versions or updates change, neither has
        the next one."""

    # ---- the learner asks

    def on_publish_request(self, learner: Peer, msg_id: str, req: PublishRequest, actors: list[Peer],
                           book: VersionBook, send: Send) -> None:
        self.tensors, self.bucket_bytes = list(req.tensors), req.bucket_bytes
        self._last_nudge = float("-inf")
        if self.in_flight is not None:
            send(learner, PublishDeferred(version=req.version, reason="an update is in flight"), msg_id)
            return
        receivers = [a for a in actors if a.peer_id not in self.excluded and book.needs_update(a.peer_id)]
        if not receivers:
            send(learner, PublishDeferred(version=req.version, reason="no actor needs this version"), msg_id)
            return
        self._start(learner, msg_id, req.version, receivers, book, send)

    def _start(self, learner: Peer, msg_id: str, version: int, receivers: list[Peer], book: VersionBook,
               send: Send) -> None:
        key = (learner.incarnation, tuple((p.peer_id, p.incarnation, p.worker_count) for p in receivers))
        if key != self.epoch.key:
            self.epoch_counter += 1
            ranks, rank = {}, 1
            for p in receivers:
                ranks[p.peer_id] = rank
                rank += p.worker_count
            # The secret makes the rendezvous key a capability: only members learn it (over the
            # broker's socket, CURVE-protected when enabled), so nobody else can join the group.
            group_key = f"weights/{self.broker_incarnation}/epoch-{self.epoch_counter}/{secrets.token_hex(16)}"
            self.epoch = Epoch(self.epoch_counter, key, group_key, ranks, rank)
            log.info("new weight-group epoch", epoch=self.epoch.number, members=list(ranks), world_size=rank)

        def update(first_rank: int, discard_above: int) -> WeightUpdate:
            return WeightUpdate(
                version=version, lineage=book.session, discard_above=discard_above, epoch=self.epoch.number,
                group_key=self.epoch.group_key, group_host=self.store_host, group_port=self.store_port,
                world_size=self.epoch.world_size, first_rank=first_rank, tensors=self.tensors,
                bucket_bytes=self.bucket_bytes,
            )

        for p in receivers:
            held = book.held.get(p.peer_id)
            discard = -1 if held is None or book.valid(*held) else book.valid_through(held[0])
            send(p, update(self.epoch.first_ranks[p.peer_id], discard), None)
        send(learner, update(0, -1), msg_id)
        self.in_flight = InFlight(version, self.epoch.number, {p.peer_id for p in receivers},
                                  self.clock() + self.update_timeout_s)
        log.info("weight update started", version=version, epoch=self.epoch.number,
                 receivers=[p.peer_id for p in receivers])

    # ---- members answer

    def on_report(self, peer: Peer, version: int, epoch: int, ok: bool, error: str, book: VersionBook) -> None:
        upd = self.in_flight
        if upd is None or (version, epoch) != (upd.version, upd.epoch):
            return  # a late report of an update that already ended
        if peer.role == "learner":
            upd.learner_reported, upd.learner_ok = True, ok
            if not ok:
                log.warning("learner failed to broadcast", version=version, epoch=epoch, error=error[:300])
        elif peer.peer_id in upd.awaiting:
            upd.awaiting.discard(peer.peer_id)
            if ok:
                self.failures.pop(peer.peer_id, None)
            else:
                upd.failed.add(peer.peer_id)
                log.warning("actor failed to load weights", peer=peer.peer_id, version=version, epoch=epoch,
                            error=error[:300])
        self._maybe_finish()

    def on_death(self, peer: Peer) -> None:
        upd = self.in_flight
        if upd is None:
            return
        if peer.role == "learner" and peer.rank == 0:
            log.warning("learner died during a weight update; abandoning it", version=upd.version)
            self.in_flight = None
        elif peer.peer_id in upd.awaiting:
            upd.awaiting.discard(peer.peer_id)
            upd.failed.add(peer.peer_id)
            self._maybe_finish()

    def abandon(self, reason: str) -> None:
        """Forget the update in flight (its learner session is over); reports of it are ignored."""
        if self.in_flight is not None:
            log.warning("abandoning the weight update in flight", reason=reason, version=self.in_flight.version,
                        epoch=self.in_flight.epoch)
            self.in_flight = None

    def on_registered(self, peer: Peer) -> None:
        """A fresh Hello lifts an exclusion: the peer gets another chance."""
        self.excluded.discard(peer.peer_id)
        self.failures.pop(peer.peer_id, None)

    def _maybe_finish(self, timed_out: bool = False) -> None:
        upd = self.in_flight
        if upd is None or (not timed_out and (upd.awaiting or not upd.learner_reported)):
            return
        silent = set(upd.awaiting)
        for peer_id in upd.failed | silent:
            self.failures[peer_id] += 1
            # Blame a receiver only when the learner's side worked: otherwise everyone failed with it.
            if (peer_id in silent or (upd.learner_reported and upd.learner_ok)) \
                    and self.failures[peer_id] >= self.max_failures:
                self.excluded.add(peer_id)
                log.warning("actor excluded from weight updates until it registers again", peer=peer_id,
                            failures=self.failures[peer_id])
        if timed_out:
            log.warning("weight update timed out", version=upd.version, epoch=upd.epoch, silent=sorted(silent),
                        learner_reported=upd.learner_reported)
        elif upd.failed or not upd.learner_ok:
            log.warning("weight update ended with failures", version=upd.version, epoch=upd.epoch,
                        failed=sorted(upd.failed), learner_ok=upd.learner_ok)
        else:
            log.info("weight update complete", version=upd.version, epoch=upd.epoch)
        self.in_flight = None

    # ---- time

    def tick(self, learner: Peer | None, actors: list[Peer], book: VersionBook, send: Send) -> None:
        upd = self.in_flight
        now = self.clock()
        if upd is not None and now >= upd.deadline:
            for peer_id in upd.awaiting:
                self.excluded.add(peer_id)  # silent past the deadline: stuck, not merely slow
            self._maybe_finish(timed_out=True)
        self.maybe_nudge(learner, actors, book, send)

    def maybe_nudge(self, learner: Peer | None, actors: list[Peer], book: VersionBook, send: Send) -> None:
        """Ask the learner to publish when an actor lacks the latest version and nothing is running."""
        self.nudge_idle = True
        if self.in_flight is not None or learner is None:
            return
        behind = [a.peer_id for a in actors if a.peer_id not in self.excluded and book.needs_update(a.peer_id)]
        if not behind:
            return
        self.nudge_idle = False
        now = self.clock()
        if now - self._last_nudge < self.nudge_interval_s:
            return
        self._last_nudge = now
        reason = f"actors without version {book.latest_version}: {', '.join(behind[:8])}"
        if reason != self._nudge_reason:
            log.info("asking the learner to publish", reason=reason)
            self._nudge_reason = reason
        send(learner, PublishWanted(latest_version=book.latest_version, reason=reason), None)

    def next_deadline(self) -> float | None:
        times = []
        if self.in_flight is not None:
            times.append(self.in_flight.deadline)
        return min(times, default=None)
