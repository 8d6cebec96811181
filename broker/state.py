"""The broker's coordination logic as a pure state machine: no sockets, no threads, no wall clock.

`BrokerState.handle(peer, data)` takes the raw bytes one connection sent and returns the messages
to send (`Outgoing`); `tick()` runs the time-driven rules (death detection, update timeouts). Time
comes from an injectable `clock`, so tests drive it by hand. The server loop (broker/server.py) only
moves bytes between a transport and this class.

Replies carry the envelope `msg_id` of the request they answer (Ack, Error, Status, RolloutBatch,
and the learner's "go" WeightsAnnounce); messages the broker starts get a fresh id.

With `mode="stop_the_world"` (weights.mode) the broker also enforces strict on-policy batches: per
published version it accepts at most `rollouts_per_step` rollouts, in whole groups, whose tokens are
all at that version (`RolloutQuota`); past the quota it refuses with `rejected` (the actor keeps them)
and every Ack says how much quota is left, so actors stop starting groups. Rollouts with a token
older than the latest version are acked and dropped as stale, counted like every other stale drop.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tether.broker.buffer import RolloutBuffer
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.errors import WireDecodeError
from tether.common.logging import get_logger
from tether.common.messages import (
    Ack,
    BatchRequest,
    Error,
    Heartbeat,
    Hello,
    PeerStatus,
    Record,
    Rollout,
    RolloutBatch,
    Status,
    StatusRequest,
    TensorSpec,
    VersionAck,
    WeightsAnnounce,
)

BROKER_ID = "broker"
RATE_WINDOW_S = 10.0
# Dead peers stay visible in `tether status` for this many peer timeouts, then are forgotten.
DEAD_PEER_RETENTION = 6


@dataclass
class Outgoing:
    """One message to send: to the connection `peer`, with envelope id `msg_id` (None: fresh)."""

    peer: bytes
    body: Record
    msg_id: str | None = None

    def encode(self) -> bytes:
        return wire.encode(self.body, sender=BROKER_ID, msg_id=self.msg_id)


@dataclass
class PeerInfo:
    peer_id: str
    role: str
    identity: bytes
    worker_count: int
    incarnation: tuple[str, int]
    last_seen: float
    loaded_version: int
    alive: bool = True
    ready: bool = True
    """An actor is ready once it holds the version that was latest when it joined."""
    required_version: int = 0
    unacked_rollouts: int = 0


@dataclass
class PendingUpdate:
    version: int
    epoch: int
    awaiting: set[str]
    deadline: float


@dataclass
class ParkedRequest:
    identity: bytes
    msg_id: str
    request: BatchRequest


@dataclass
class RolloutQuota:
    """stop_the_world: what the broker still accepts at `version` (the latest published one).

    A group reserves `group_size` rollouts when its first member is admitted, so later members (in
    other messages, or resent) always fit and groups stay whole; `used` never exceeds `per_version`.
    """

    per_version: int
    version: int = 0
    used: int = 0
    admitted: dict[str, tuple[str, int]] = field(default_factory=dict)
    """group id -> (actor id, reserved size) for the groups admitted at `version`."""
    stale_groups: set[str] = field(default_factory=set)
    """Groups with a stale member at `version`: their later members are dropped too (groups stay whole)."""

    @property
    def left(self) -> int:
        return self.per_version - self.used

    def reset(self, version: int) -> None:
        self.version, self.used = version, 0
        self.admitted.clear()
        self.stale_groups.clear()

    def admit(self, group_id: str, actor_id: str, size: int) -> bool:
        if group_id in self.admitted:
            return True
        if self.used + size > self.per_version:
            return False
        self.admitted[group_id] = (actor_id, size)
        self.used += size
        return True

    def release(self, group_id: str) -> None:
        entry = self.admitted.pop(group_id, None)
        if entry is not None:
            self.used -= entry[1]


@dataclass
class Epoch:
    number: int = 0
    key: tuple | None = None
    first_ranks: dict[str, int] = field(default_factory=dict)
    world_size: int = 1


class BrokerState:
    """Peers, the version book, weight-update sequencing and the rollout buffer."""

    def __init__(
        self,
        cfg: BrokerConfig,
        buffer: RolloutBuffer | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        mode: str = "inflight",
        rollouts_per_step: int = 0,
    ) -> None:
        """`mode` and `rollouts_per_step` come from the run config (weights.mode,
        learner.rollouts_per_step); the quota exists only for mode "stop_the_world"."""
        if mode not in ("inflight", "stop_the_world"):
            raise ValueError(f"unknown weights mode {mode!r}")
        if mode == "stop_the_world" and rollouts_per_step < 1:
            raise ValueError("stop_the_world needs rollouts_per_step >= 1")
        self.cfg = cfg
        self.mode = mode
        self.quota = RolloutQuota(rollouts_per_step) if mode == "stop_the_world" else None
        self.buffer = buffer if buffer is not None else RolloutBuffer(cfg.buffer_capacity, dedup_window=cfg.dedup_window)
        self.clock = clock
        self.log = get_logger("tether.broker")
        self.peers: dict[str, PeerInfo] = {}
        self.counters: Counter[str] = Counter()
        self.latest_version = 0
        self.epoch = Epoch()
        self.update: PendingUpdate | None = None
        self.excluded: set[str] = set()
        self.learner_id: str | None = None
        self._tensors: list[TensorSpec] = []
        self._bucket_bytes = 1
        self._queued_announce: tuple[int, str] | None = None  # (version, learner request msg_id)
        self._parked: dict[str, ParkedRequest] = {}
        self._dropped_for: Counter[str] = Counter()
        # Stale drops not caused by one rank's request (on arrival, at an announce): reported in the
        # next batch served to any rank, so the learner's samples_dropped includes them.
        self._dropped_unreported = 0
        self._rate: deque[tuple[float, int]] = deque()

    # ------------------------------------------------------------------ entry points

    def handle(self, peer: bytes, data: bytes | None) -> list[Outgoing]:
        """Decode one message from connection `peer` and apply it. Never raises on bad input."""
        if data is None:
            return self._reject(peer, "malformed", "expected exactly one frame per message", "")
        try:
            message = wire.decode(data, max_bytes=self.cfg.max_message_bytes)
        except WireDecodeError as exc:
            text = str(exc)
            code = "malformed"
            if "$.schema" in text:
                code = "schema_mismatch"
            elif "$.kind" in text:
                code = "unknown_kind"
            elif "exceeds the limit" in text:
                code = "too_large"
            return self._reject(peer, code, text, _msg_id_of(data))
        try:
            return self.handle_message(peer, message)
        except Exception as exc:  # a bug must cost one message, not the daemon
            self.counters["internal_errors"] += 1
            self.log.exception("internal error handling message", kind=message.kind, sender=message.sender)
            return [Outgoing(peer, Error(code="internal", message=f"{type(exc).__name__}: {exc}",
                                         ref_msg_id=message.msg_id), message.msg_id)]

    def handle_message(self, peer: bytes, message: wire.Message) -> list[Outgoing]:
        body = message.body
        self.counters[f"recv_{message.kind}"] += 1
        if isinstance(body, Hello):
            return self._on_hello(peer, message, body)
        if isinstance(body, StatusRequest):
            return [Outgoing(peer, self.status(), message.msg_id)]
        info = self.peers.get(message.sender)
        if info is None or not info.alive:
            return self._reject(peer, "not_registered", f"peer {message.sender!r} must send Hello first", message.msg_id)
        info.identity = peer
        info.last_seen = self.clock()
        if isinstance(body, Heartbeat):
            return self._on_heartbeat(info, body)
        if isinstance(body, Rollout):
            return self._on_rollouts(info, message, [body])
        if isinstance(body, RolloutBatch):
            return self._on_rollouts(info, message, body.rollouts)
        if isinstance(body, BatchRequest):
            return self._on_batch_request(info, message, body)
        if isinstance(body, WeightsAnnounce):
            return self._on_weights_announce(info, message, body)
        if isinstance(body, VersionAck):
            return self._on_version_ack(info, body)
        if isinstance(body, Error):
            self.counters["peer_errors"] += 1
            self.log.warning("peer reported an error", peer=info.peer_id, code=body.code, message=body.message)
            return []
        return self._reject(peer, "malformed", f"the broker does not accept {message.kind!r}", message.msg_id)

    def tick(self) -> list[Outgoing]:
        """Time-driven rules: declare silent peers dead, time out weight updates."""
        now = self.clock()
        out: list[Outgoing] = []
        for info in list(self.peers.values()):
            silent = now - info.last_seen
            if info.alive and silent > self.cfg.peer_timeout_s:
                info.alive = False
                self.counters["peers_died"] += 1
                self.log.warning("peer declared dead", peer=info.peer_id, role=info.role, silent_s=round(silent, 2))
                self._parked.pop(info.peer_id, None)
                if info.role == "actor":
                    self._release_quota_of(info.peer_id)
                if self.update is not None and info.peer_id == self.learner_id:
                    self.log.warning("learner died during an update; abandoning it", version=self.update.version)
                    self.update = None
                elif self.update is not None and info.peer_id in self.update.awaiting:
                    self._reform(out, {info.peer_id}, reason="member died")
            elif not info.alive and silent > DEAD_PEER_RETENTION * self.cfg.peer_timeout_s:
                del self.peers[info.peer_id]
        if self.update is not None and now >= self.update.deadline:
            self._reform(out, set(self.update.awaiting), reason="update timed out")
        self._maybe_start_update(out)
        return out

    def next_deadline(self) -> float:
        """When `tick` next has something to do (the server may sleep until then)."""
        times = [info.last_seen + self.cfg.peer_timeout_s for info in self.peers.values() if info.alive]
        if self.update is not None:
            times.append(self.update.deadline)
        return min(times, default=self.clock() + self.cfg.heartbeat_interval_s)

    def status(self) -> Status:
        now = self.clock()
        peers = [
            PeerStatus(
                peer_id=p.peer_id,
                role=p.role,  # type: ignore[arg-type]
                alive=p.alive,
                loaded_version=p.loaded_version,
                lag=max(0, self.latest_version - max(p.loaded_version, 0)) if p.role == "actor" else 0,
                seconds_since_seen=round(now - p.last_seen, 3),
            )
            for p in sorted(self.peers.values(), key=lambda p: (p.role, p.peer_id))
        ]
        return Status(
            peers=peers,
            latest_version=self.latest_version,
            epoch=self.epoch.number,
            buffer_depth=self.buffer.depth,
            rollouts_per_second=self.rollouts_per_second(),
            stored_total=self.buffer.stored_total,
            dropped_stale_total=self.buffer.dropped_stale_total,
            consumed_total=self.buffer.consumed_total,
            quota_version=self.quota.version if self.quota is not None else -1,
            quota_left=self.quota.left if self.quota is not None else -1,
        )

    def rollouts_per_second(self) -> float:
        now = self.clock()
        while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        return round(sum(n for _, n in self._rate) / RATE_WINDOW_S, 3)

    # ------------------------------------------------------------------ handlers

    def _reject(self, peer: bytes, code: str, text: str, ref: str) -> list[Outgoing]:
        self.counters[f"error_{code}"] += 1
        if code in ("malformed", "unknown_kind", "schema_mismatch", "too_large"):
            self.log.info("bad message", code=code, error=text[:300])
        return [Outgoing(peer, Error(code=code, message=text[:1000], ref_msg_id=ref), ref or None)]  # type: ignore[arg-type]

    def _on_hello(self, peer: bytes, message: wire.Message, hello: Hello) -> list[Outgoing]:
        if hello.peer_id != message.sender:
            return self._reject(peer, "malformed", "Hello.peer_id must equal the envelope sender", message.msg_id)
        now = self.clock()
        old = self.peers.get(hello.peer_id)
        if old is None and len(self.peers) >= self.cfg.max_peers:
            return self._reject(peer, "rejected", f"the broker already has {self.cfg.max_peers} peers", message.msg_id)
        incarnation = (hello.host, hello.pid)
        info = PeerInfo(
            peer_id=hello.peer_id,
            role=hello.role,
            identity=peer,
            worker_count=hello.worker_count if hello.role == "actor" else 0,
            incarnation=incarnation,
            last_seen=now,
            loaded_version=hello.loaded_version,
        )
        if hello.role == "actor":
            # A joining actor must first hold what is current now; until then its rollouts wait.
            info.required_version = self.latest_version
            info.ready = hello.loaded_version >= self.latest_version
            if old is not None and old.ready and old.incarnation == incarnation and old.alive:
                info.ready = True  # the same process re-registering (e.g. after a broker restart)
        self.peers[hello.peer_id] = info
        self.excluded.discard(hello.peer_id)
        event = "peer joined" if old is None or not old.alive or old.incarnation != incarnation else "peer re-registered"
        self.log.info(event, peer=hello.peer_id, role=hello.role, workers=hello.worker_count,
                      loaded_version=hello.loaded_version, ready=info.ready)
        out = [Outgoing(peer, self.status(), message.msg_id)]
        self._maybe_start_update(out)
        return out

    def _on_heartbeat(self, info: PeerInfo, hb: Heartbeat) -> list[Outgoing]:
        if hb.loaded_version >= 0:
            info.loaded_version = hb.loaded_version
        info.unacked_rollouts = hb.unacked_rollouts
        return []

    def _on_rollouts(self, info: PeerInfo, message: wire.Message, rollouts: list[Rollout]) -> list[Outgoing]:
        if not info.ready:
            return self._reject(
                info.identity, "rejected",
                f"not ready: load weight version {info.required_version} first, then resend", message.msg_id)
        stale: list[Rollout] = []
        over_quota: list[Rollout] = []
        admitted_now: set[str] = set()
        if self.quota is not None:
            rollouts, stale, over_quota, admitted_now = self._apply_quota(rollouts)
        result = self.buffer.add(rollouts)
        for gid in admitted_now:
            if not self.buffer.has_group(gid):
                self.quota.release(gid)  # type: ignore[union-attr]  # refused for capacity: nothing reserved
        now = self.clock()
        if result.stored:
            self._rate.append((now, len(result.stored)))
        acked, duplicates = result.acked, len(result.duplicates)
        if stale:
            discarded = self.buffer.discard_stale(stale)
            acked, duplicates = acked + discarded.acked, duplicates + len(discarded.duplicates)
            if discarded.stored:
                self._dropped_unreported += len(discarded.stored)
                self.counters["dropped_stale_on_arrival"] += len(discarded.stored)
                self.log.info("dropped stale rollouts on arrival", count=len(discarded.stored), peer=info.peer_id,
                              latest_version=self.latest_version)
        out: list[Outgoing] = []
        # stop_the_world: always answer with the quota (even with nothing acked), so the actor knows
        # to stop starting groups at this version.
        if acked or self.quota is not None:
            quota = self.quota
            out.append(Outgoing(info.identity, Ack(
                rollout_ids=acked, duplicates=duplicates,
                quota_version=quota.version if quota is not None else -1,
                quota_left=quota.left if quota is not None else -1), message.msg_id))
        if result.refused:
            self.counters["refused_rollouts"] += len(result.refused)
            out.extend(self._reject(
                info.identity, "rejected",
                f"buffer full ({self.buffer.depth}/{self.buffer.capacity}): {len(result.refused)} rollouts refused, "
                "keep them and retry later", message.msg_id))
        if over_quota:
            self.counters["over_quota_rollouts"] += len(over_quota)
            out.extend(self._reject(
                info.identity, "rejected",
                f"stop_the_world quota for version {self.latest_version} is full: {len(over_quota)} rollouts "
                "refused, keep them; they will be acked (as stale) after the next version", message.msg_id))
        out.extend(self._serve_parked())
        return out

    def _apply_quota(self, rollouts: list[Rollout]) -> tuple[list[Rollout], list[Rollout], list[Rollout], set[str]]:
        """stop_the_world: split into (to store, stale, over quota, groups admitted by this call)."""
        quota = self.quota
        assert quota is not None
        keep: list[Rollout] = []
        stale: list[Rollout] = []
        over: list[Rollout] = []
        admitted_now: set[str] = set()
        for rollout in rollouts:
            gid = rollout.group_id
            if self.buffer.seen(rollout.rollout_id):
                keep.append(rollout)  # a duplicate: the buffer acks it again, no quota involved
            elif gid in quota.stale_groups or self._stale_on_arrival(rollout):
                stale.append(rollout)
                if gid not in quota.stale_groups:
                    quota.stale_groups.add(gid)
                    # Groups stay whole: a group with a stale member goes entirely, buffered part included.
                    quota.release(gid)
                    if self.buffer.has_group(gid):
                        self._dropped_unreported += self.buffer.drop_group(gid)
            elif gid in quota.admitted or self.buffer.has_group(gid):
                keep.append(rollout)  # the rest of a group already admitted: its room is reserved
            elif quota.admit(gid, rollout.actor_id, rollout.group_size):
                admitted_now.add(gid)
                keep.append(rollout)
            else:
                over.append(rollout)
        return keep, stale, over, admitted_now

    def _stale_on_arrival(self, rollout: Rollout) -> bool:
        """Not every token at the latest version (an empty completion is never stale, as in drop_stale)."""
        if rollout.num_completion_tokens == 0:
            return False
        versions = rollout.versions.numpy()
        return int(versions[0]) < self.latest_version or int(versions[-1]) != int(versions[0])

    def _release_quota_of(self, actor_id: str) -> None:
        """A dead actor's incomplete groups may never complete: give their reserved room back."""
        if self.quota is None:
            return
        for gid, (owner, _) in list(self.quota.admitted.items()):
            if owner == actor_id and not self.buffer.is_complete(gid):
                self.quota.release(gid)
                self.log.info("released quota of an incomplete group of a dead actor", group=gid, actor=actor_id)

    def _on_batch_request(self, info: PeerInfo, message: wire.Message, req: BatchRequest) -> list[Outgoing]:
        # One parked request per learner rank: a re-sent request replaces the older one.
        self._parked[info.peer_id] = ParkedRequest(info.identity, message.msg_id, req)
        return self._serve_parked()

    def _serve_parked(self) -> list[Outgoing]:
        out: list[Outgoing] = []
        for peer_id in list(self._parked):
            parked = self._parked[peer_id]
            # Staleness is judged when a batch is served, not when it was asked for: rollouts that
            # arrived while the request waited (e.g. resent from an actor's queue) may be too old.
            req = parked.request
            dropped = self.buffer.drop_stale(req.learner_version - req.max_lag)
            if dropped:
                self._dropped_for[peer_id] += dropped
                self.log.info("dropped stale rollouts", count=dropped, learner_version=req.learner_version,
                              max_lag=req.max_lag)
            batch = self.buffer.take(req.size)
            if batch is None:
                break  # FIFO across ranks: nobody overtakes a rank that is still waiting
            del self._parked[peer_id]
            dropped = self._dropped_for.pop(peer_id, 0) + self._dropped_unreported
            self._dropped_unreported = 0
            out.append(Outgoing(parked.identity, RolloutBatch(rollouts=batch, dropped_stale=dropped), parked.msg_id))
        return out

    def _on_weights_announce(self, info: PeerInfo, message: wire.Message, ann: WeightsAnnounce) -> list[Outgoing]:
        if info.role != "learner":
            return self._reject(info.identity, "rejected", "only the learner announces weights", message.msg_id)
        if ann.version < self.latest_version:
            return self._reject(info.identity, "rejected",
                                f"version {ann.version} is older than the published {self.latest_version}", message.msg_id)
        self.learner_id = info.peer_id
        self._tensors = list(ann.tensors)
        self._bucket_bytes = ann.bucket_bytes
        self.latest_version = ann.version
        if self.quota is not None and ann.version > self.quota.version:
            # A new version: a fresh quota, and nothing older may be served any more (lag 0 only).
            self.quota.reset(ann.version)
            dropped = self.buffer.drop_stale(ann.version)
            if dropped:
                self._dropped_unreported += dropped
                self.log.info("dropped stale rollouts at a new version", count=dropped, version=ann.version)
        info.loaded_version = ann.version
        self._queued_announce = (ann.version, message.msg_id)
        self.log.info("weights announced", version=ann.version, tensors=len(ann.tensors))
        out: list[Outgoing] = []
        self._maybe_start_update(out)
        return out

    def _on_version_ack(self, info: PeerInfo, ack: VersionAck) -> list[Outgoing]:
        out: list[Outgoing] = []
        if ack.ok:
            info.loaded_version = max(info.loaded_version, ack.version)
            if not info.ready and info.loaded_version >= info.required_version:
                info.ready = True
                self.log.info("actor ready", peer=info.peer_id, version=info.loaded_version)
        else:
            self.log.warning("actor failed to load weights", peer=info.peer_id, version=ack.version, error=ack.error)
        upd = self.update
        if upd is not None and ack.version == upd.version and ack.epoch == upd.epoch and info.peer_id in upd.awaiting:
            if ack.ok:
                upd.awaiting.discard(info.peer_id)
                if not upd.awaiting:
                    self.log.info("weight update complete", version=upd.version, epoch=upd.epoch)
                    self.update = None
            else:
                self._reform(out, {info.peer_id}, reason="member failed to load")
        self._maybe_start_update(out)
        return out

    # ------------------------------------------------------------------ weight updates

    def _learner_alive(self) -> PeerInfo | None:
        info = self.peers.get(self.learner_id or "")
        return info if info is not None and info.alive else None

    def _candidates(self) -> list[PeerInfo]:
        return sorted(
            (p for p in self.peers.values() if p.role == "actor" and p.alive and p.peer_id not in self.excluded),
            key=lambda p: p.peer_id,
        )

    def _maybe_start_update(self, out: list[Outgoing]) -> None:
        """Start the next update if none is in flight: a queued learner announce first, else a
        re-publish of the latest version when an actor lacks it."""
        if self.update is not None:
            return
        learner = self._learner_alive()
        if learner is None:
            return
        if self._queued_announce is not None:
            version, msg_id = self._queued_announce
            self._queued_announce = None
            self._start_update(out, learner, version, msg_id)
        elif self.latest_version > 0 and any(p.loaded_version < self.latest_version for p in self._candidates()):
            self.counters["republishes"] += 1
            self._start_update(out, learner, self.latest_version, None)

    def _start_update(self, out: list[Outgoing], learner: PeerInfo, version: int, msg_id: str | None) -> None:
        members = self._candidates()
        key = (learner.incarnation, tuple((p.peer_id, p.incarnation, p.worker_count) for p in members))
        if key != self.epoch.key:
            rank = 1
            ranks: dict[str, int] = {}
            for p in members:
                ranks[p.peer_id] = rank
                rank += p.worker_count
            self.epoch = Epoch(number=self.epoch.number + 1, key=key, first_ranks=ranks, world_size=rank)
            self.log.info("new weight-group epoch", epoch=self.epoch.number, members=list(ranks),
                          world_size=self.epoch.world_size)

        def announce(first_rank: int) -> WeightsAnnounce:
            return WeightsAnnounce(
                version=version, epoch=self.epoch.number, tensors=self._tensors, bucket_bytes=self._bucket_bytes,
                group_host=self.cfg.host, group_port=self.cfg.store_port,
                group_world_size=self.epoch.world_size, first_rank=first_rank,
            )

        for p in members:
            out.append(Outgoing(p.identity, announce(self.epoch.first_ranks[p.peer_id])))
        out.append(Outgoing(learner.identity, announce(0), msg_id))
        self.counters["updates_started"] += 1
        if members:
            self.update = PendingUpdate(version=version, epoch=self.epoch.number,
                                        awaiting={p.peer_id for p in members},
                                        deadline=self.clock() + self.cfg.update_timeout_s)
        else:
            self.log.info("weights published with no actors", version=version)

    def _reform(self, out: list[Outgoing], missing: set[str], reason: str) -> None:
        """Drop `missing` from the update in flight and send the same version to a new epoch."""
        upd = self.update
        assert upd is not None
        self.counters["updates_reformed"] += 1
        for peer_id in missing:
            info = self.peers.get(peer_id)
            if info is not None and info.alive:
                # Alive but failed: keep it out until it registers again (a fresh Hello).
                self.excluded.add(peer_id)
        self.log.warning("re-forming weight group", reason=reason, version=upd.version, epoch=upd.epoch,
                         missing=sorted(missing))
        self.update = None
        learner = self._learner_alive()
        if learner is not None:
            self._start_update(out, learner, upd.version, None)


def _msg_id_of(data: bytes) -> str:
    """Best effort: the msg_id of an envelope whose body (or schema) was bad, for the Error's ref."""
    try:
        import msgspec

        if len(data) > 1 << 20:
            return ""  # not worth decoding a huge invalid message just for an id
        raw = msgspec.msgpack.decode(data)
        if isinstance(raw, dict) and isinstance(raw.get("msg_id"), str):
            return raw["msg_id"][:64]
    except Exception:
        pass
    return ""
