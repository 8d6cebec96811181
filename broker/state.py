"""The broker's coordination logic as a pure state machine: no sockets, no threads, no wall clock.

`BrokerState.handle(peer, data, credential)` takes the raw bytes one connection sent and returns
the messages to send (`Outgoing`); `tick()` runs the time-driven rules (death detection, update
timeouts, publish nudges, expiry of orphaned groups). Time comes from an injectable `clock`, so
tests drive it by hand. The server loop (broker/server.py) only moves bytes.

The work is split by concern, each in its own module:

- membership.py  who is connected, liveness, roles
- versions.py    the version book: latest version, lineage, what each actor holds
- updates.py     weight updates: epochs, receivers, failures, publish nudges
- ledger.py      the rollout ledger: buffer, leases, commits, drops, the journal
- admission.py   generation grants: actors start only what the learner can still use
- validation.py  rules a rollout must satisfy against the run

This module decodes, checks who may send what, and routes each message to those parts. Replies
carry the envelope `msg_id` of the request they answer; messages the broker starts get a fresh id.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from tether.broker.admission import Admission, AdmissionPolicy
from tether.broker.journal import Meta
from tether.broker.ledger import Ledger, lease_key
from tether.broker.membership import Membership, Peer, RegistrationRefused
from tether.broker.updates import WeightUpdates
from tether.broker.validation import RolloutRules
from tether.broker.versions import VersionBook
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.errors import WireDecodeError
from tether.common.logging import get_logger
from tether.common.messages import (
    Ack,
    BatchRequest,
    Commit,
    CommitAck,
    Error,
    GenerationRequest,
    Heartbeat,
    Hello,
    PeerStatus,
    PublishRequest,
    Record,
    Rollout,
    RolloutBatch,
    RolloutRejection,
    Status,
    StatusRequest,
    SubmitRollouts,
    UpdateReport,
    Welcome,
)
from tether.common.staleness import is_stale

BROKER_ID = "broker"
RATE_WINDOW_S = 10.0

# Which roles may send which record (Hello and StatusRequest need no registration).
ACCEPTED_FROM: dict[type[Record], frozenset[str]] = {
    Heartbeat: frozenset({"actor", "learner", "tool"}),
    Error: frozenset({"actor", "learner", "tool"}),
    SubmitRollouts: frozenset({"actor"}),
    GenerationRequest: frozenset({"actor"}),
    UpdateReport: frozenset({"actor", "learner"}),
    BatchRequest: frozenset({"learner"}),
    PublishRequest: frozenset({"learner"}),
    Commit: frozenset({"learner"}),
}


# Records whose handling changes nothing a publish nudge depends on (membership, the version
# book, weight updates): the rollout traffic. After them the nudge check, a scan of every actor,
# runs only while the previous check found someone behind.
NUDGE_NEUTRAL: frozenset[type[Record]] = frozenset({SubmitRollouts, Heartbeat, BatchRequest, Commit,
                                                     GenerationRequest, StatusRequest})


@dataclass(frozen=True)
class RunPolicy:
    """What the broker must know of the run beyond its own section (from the run config)."""

    mode: str = "inflight"
    """weights.mode."""
    rollouts_per_step: int = 64
    group_size: int = 8
    max_lag: int = 4
    max_tokens: int = 16
    publish_interval: int = 1
    vocab_size: int | None = None

    @classmethod
    def from_run_config(cls, config, vocab_size: int | None = None) -> RunPolicy:
        return cls(mode=config.weights.mode, rollouts_per_step=config.learner.rollouts_per_step,
                   group_size=config.actor.sampling.group_size, max_lag=config.learner.max_lag,
                   max_tokens=config.actor.sampling.max_tokens, publish_interval=config.learner.publish_interval,
                   vocab_size=vocab_size)


@dataclass
class Outgoing:
    """One message to send: to the connection `peer`, with envelope id `msg_id` (None: fresh)."""

    peer: bytes
    body: Record
    msg_id: str | None = None

    def encode(self) -> bytes:
        return wire.encode(self.body, sender=BROKER_ID, msg_id=self.msg_id)


@dataclass
class ParkedBatch:
    identity: bytes
    msg_id: str
    session: str
    request: BatchRequest


class BrokerState:
    """Routes every message to membership, versions, updates, ledger and admission."""

    def __init__(
        self,
        cfg: BrokerConfig,
        policy: RunPolicy | None = None,
        *,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.monotonic,
        incarnation: str | None = None,
        key_roles: dict[str, frozenset[str]] | None = None,
    ) -> None:
        """`key_roles` (CURVE on): the roles each client public key may register as."""
        self.cfg = cfg
        self.policy = policy or RunPolicy()
        self.clock = clock
        self.incarnation = incarnation or uuid.uuid4().hex[:16]
        self.key_roles = key_roles
        self.log = get_logger("tether.broker")
        self.counters: dict[str, int] = {}
        self.members = Membership(peer_timeout_s=cfg.peer_timeout_s, max_peers=cfg.max_peers, clock=clock)
        self.book = VersionBook()
        self.ledger = ledger if ledger is not None else Ledger(cfg.buffer_capacity, dedup_window=cfg.dedup_window,
                                                               clock=clock)
        self.ledger.clock = clock
        self.ledger.meta = self._meta
        self.updates = WeightUpdates(
            store_host=cfg.host, store_port=cfg.store_port, update_timeout_s=cfg.update_timeout_s,
            nudge_interval_s=max(1.0, 2 * cfg.heartbeat_interval_s), broker_incarnation=self.incarnation, clock=clock,
        )
        self.admission = Admission(AdmissionPolicy(self.policy.mode, self.policy.rollouts_per_step,
                                                   self.policy.group_size, self.policy.max_lag, cfg.buffer_capacity))
        self.rules = RolloutRules(self.policy.group_size, self.policy.max_tokens, self.policy.vocab_size)
        self.committed_version = -1
        self._parked: OrderedDict[str, ParkedBatch] = OrderedDict()
        self._unreported_drops = 0
        self._delivered_groups: OrderedDict[str, None] = OrderedDict()
        self._stale_groups: set[str] = set()  # stop_the_world: groups with a member stale on arrival
        self._rate: deque[tuple[float, int]] = deque()
        self._next_expiry = clock() + cfg.incomplete_group_ttl_s
        self._restore(self.ledger.replay())

    # ------------------------------------------------------------------ persistence

    def _meta(self) -> Meta:
        return Meta(latest_version=self.book.latest_version, lineage=list(self.book.lineage),
                    epoch=self.updates.epoch_counter, committed_version=self.committed_version,
                    session=self.book.session, **self.ledger.counters())

    def _restore(self, meta: Meta | None) -> None:
        if meta is not None:
            self.book.latest_version = self.book.learner_version = meta.latest_version
            self.book.lineage = [tuple(entry) for entry in meta.lineage]
            self.updates.epoch_counter = meta.epoch
            self.committed_version = meta.committed_version
        if self.ledger.journal is not None:
            self.ledger.maybe_compact(at_start=True)
            self.log.info("journal replayed", buffered=self.ledger.depth, leased=self.ledger.leased,
                          latest_version=self.book.latest_version, epoch=self.updates.epoch_counter,
                          **self.ledger.counters())

    def _save_meta(self) -> None:
        if self.ledger.journal is not None:
            self.ledger.journal.meta(self._meta())

    # ------------------------------------------------------------------ entry points

    def handle(self, peer: bytes, data: bytes | None, credential: str | None = None) -> list[Outgoing]:
        """Decode one message from connection `peer` and apply it. Never raises on bad input.

        `credential` is the CURVE public key the connection authenticated with (None without CURVE).
        """
        if data is None:
            return self._error(peer, "malformed", "expected exactly one frame per message", "")
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
            return self._error(peer, code, text, _msg_id_of(data))
        try:
            return self.handle_message(peer, message, credential)
        except Exception as exc:  # a bug must cost one message, not the daemon
            self._count("internal_errors")
            self.log.exception("internal error handling message", kind=message.kind, sender=message.sender)
            return [Outgoing(peer, Error(code="internal", message=f"{type(exc).__name__}: {exc}",
                                         ref_msg_id=message.msg_id), message.msg_id)]

    def handle_message(self, identity: bytes, message: wire.Message, credential: str | None = None) -> list[Outgoing]:
        body, msg_id = message.body, message.msg_id
        self._count(f"recv_{message.kind}")
        out: list[Outgoing] = []
        if isinstance(body, Hello):
            self._on_hello(identity, credential, message, body, out)
        elif isinstance(body, StatusRequest):
            out.append(Outgoing(identity, self.status(), msg_id))
        elif type(body) not in ACCEPTED_FROM:
            return self._error(identity, "malformed", f"the broker does not accept {message.kind!r}", msg_id)
        else:
            peer = self.members.alive(message.sender)
            if peer is None:
                return self._error(identity, "not_registered", f"peer {message.sender!r} must send Hello first", msg_id)
            if peer.credential != credential:
                return self._error(identity, "forbidden", f"{message.sender!r} is registered with another key", msg_id)
            if peer.role not in ACCEPTED_FROM[type(body)]:
                return self._error(identity, "forbidden", f"a {peer.role} may not send {message.kind!r}", msg_id)
            self.members.touch(peer, identity)
            self._dispatch(peer, message, out)
        self._serve(out, nudge=type(body) not in NUDGE_NEUTRAL)
        return out

    def _dispatch(self, peer: Peer, message: wire.Message, out: list[Outgoing]) -> None:
        body, msg_id = message.body, message.msg_id
        if isinstance(body, Heartbeat):
            return
        if isinstance(body, SubmitRollouts):
            self._on_submit(peer, msg_id, body.rollouts, out, message.raw_rollouts, message.max_token_id)
        elif isinstance(body, GenerationRequest):
            self.admission.request(peer.peer_id, peer.identity, msg_id, body)
        elif isinstance(body, BatchRequest):
            self._on_batch_request(peer, msg_id, body, out)
        elif isinstance(body, PublishRequest):
            self._on_publish(peer, msg_id, body, out)
        elif isinstance(body, UpdateReport):
            self._on_update_report(peer, body)
        elif isinstance(body, Commit):
            self._on_commit(peer, msg_id, body, out)
        elif isinstance(body, Error):
            self._count("peer_errors")
            self.log.warning("peer reported an error", peer=peer.peer_id, code=body.code, message=body.message[:300])

    def tick(self) -> list[Outgoing]:
        """Time-driven rules: declare silent peers dead, time out updates, nudge, expire groups."""
        out: list[Outgoing] = []
        for peer in self.members.expire():
            self._count("peers_died")
            self.log.warning("peer declared dead", peer=peer.peer_id, role=peer.role,
                             silent_s=round(self.clock() - peer.last_seen, 2))
            self.updates.on_death(peer)
            if peer.role == "actor":
                self.admission.forget(peer.peer_id)
            self._parked.pop(peer.peer_id, None)
        now = self.clock()
        if now >= self._next_expiry:
            self._next_expiry = now + max(1.0, self.cfg.incomplete_group_ttl_s / 4)
            dropped = self.ledger.drop_orphaned_groups(self.cfg.incomplete_group_ttl_s,
                                                       {p.peer_id for p in self.members.actors()})
            if dropped:
                self._unreported_drops += dropped
                self.log.warning("dropped incomplete groups of dead actors", rollouts=dropped)
        self.updates.tick(self.members.learner(), self.members.actors(), self.book, self._sender(out))
        self._serve(out)
        return out

    def next_deadline(self) -> float:
        """When `tick` next has something to do (the server may sleep until then)."""
        times = [t for t in (self.members.next_deadline(), self.updates.next_deadline(), self._next_expiry)
                 if t is not None]
        return min(times, default=self.clock() + self.cfg.heartbeat_interval_s)

    def status(self) -> Status:
        now = self.clock()
        latest = self.book.latest_version
        peers = []
        for p in sorted(self.members.peers.values(), key=lambda p: (p.role, p.peer_id)):
            if p.role == "actor":
                held = self.book.actor_version(p.peer_id)
                version, lag, ready = (held, latest - held, True) if held is not None else (-1, 0, False)
            else:
                version, lag, ready = (self.book.learner_version if p.role == "learner" else -1), 0, True
            peers.append(PeerStatus(peer_id=p.peer_id, role=p.role, alive=p.alive, loaded_version=version,  # type: ignore[arg-type]
                                    lag=lag, ready=ready, seconds_since_seen=round(now - p.last_seen, 3)))
        return Status(
            broker_incarnation=self.incarnation, peers=peers, latest_version=latest, lineage=self.book.session,
            epoch=self.updates.epoch.number, committed_version=self.committed_version,
            buffer_depth=self.ledger.depth, leased=self.ledger.leased,
            rollouts_per_second=self.rollouts_per_second(), granted_groups=self.admission.granted_groups,
            update_in_flight=self.updates.in_flight is not None, **self.ledger.counters(),
        )

    def rollouts_per_second(self) -> float:
        now = self.clock()
        while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        return round(sum(n for _, n in self._rate) / RATE_WINDOW_S, 3)

    # ------------------------------------------------------------------ helpers

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _error(self, identity: bytes, code: str, text: str, ref: str) -> list[Outgoing]:
        self._count(f"error_{code}")
        if code in ("malformed", "unknown_kind", "schema_mismatch", "too_large", "forbidden"):
            self.log.info("refused a message", code=code, error=text[:300])
        return [Outgoing(identity, Error(code=code, message=text[:1000], ref_msg_id=ref), ref or None)]  # type: ignore[arg-type]

    def _sender(self, out: list[Outgoing]) -> Callable[[Peer, Record, str | None], None]:
        return lambda peer, record, msg_id: out.append(Outgoing(peer.identity, record, msg_id))

    def _serve(self, out: list[Outgoing], *, nudge: bool = True) -> None:
        """After any change: serve parked batch requests, then generation requests, then nudge.

        `nudge=False`: the message changed nothing the nudge depends on, so when the last check
        found nothing to ask for, this one would not either (only the clock moved).
        """
        self._serve_batches(out)
        learner_waiting = bool(self._parked)
        next_step = self.book.learner_version + (0 if learner_waiting else 1)
        for grant in self.admission.serve(buffered=self.ledger.depth, next_step=next_step,
                                          latest_version=self.book.latest_version,
                                          actor_version=self.book.actor_version, max_version=self.book.max_held,
                                          learner_version=self.book.learner_version):
            out.append(Outgoing(grant.identity, grant.record, grant.msg_id))
        if nudge or not self.updates.nudge_idle:
            self.updates.maybe_nudge(self.members.learner(), self.members.actors(), self.book, self._sender(out))

    # ------------------------------------------------------------------ registration

    def _on_hello(self, identity: bytes, credential: str | None, message: wire.Message, hello: Hello,
                  out: list[Outgoing]) -> None:
        msg_id = message.msg_id
        if hello.peer_id != message.sender:
            out.extend(self._error(identity, "malformed", "Hello.peer_id must equal the envelope sender", msg_id))
            return
        if self.key_roles is not None and hello.role not in self.key_roles.get(credential or "", frozenset()):
            out.extend(self._error(identity, "forbidden", f"this client key may not register as a {hello.role}", msg_id))
            return
        if hello.role == "learner" and not hello.session:
            out.extend(self._error(identity, "malformed", "a learner's Hello must name its session", msg_id))
            return
        try:
            peer, event = self.members.register(hello, identity, credential)
        except RegistrationRefused as exc:
            out.extend(self._error(identity, exc.code, str(exc), msg_id))
            return
        self.updates.on_registered(peer)
        if peer.role == "actor":
            self.admission.forget(peer.peer_id)
            self.book.record(peer.peer_id, hello.loaded_lineage, hello.loaded_version)
        elif peer.role == "learner":
            self._on_learner_hello(peer, hello)
        ready = peer.role != "actor" or self.book.actor_version(peer.peer_id) is not None
        self.log.info(f"peer {event}", peer=peer.peer_id, role=peer.role, rank=peer.rank, workers=peer.worker_count,
                      loaded_version=hello.loaded_version, ready=ready)
        out.append(Outgoing(identity, Welcome(broker_incarnation=self.incarnation,
                                              latest_version=self.book.latest_version, lineage=self.book.session,
                                              ready=ready), msg_id))

    def _on_learner_hello(self, peer: Peer, hello: Hello) -> None:
        if hello.session == self.book.session:
            return  # the same training session registering again (after a broker restart)
        previous = self.book.latest_version
        rewind = self.book.fork(hello.session, hello.loaded_version)
        committed = max(hello.committed_version, 0)
        consumed, returned = self.ledger.end_other_sessions(hello.session, committed)
        self.committed_version = hello.committed_version
        dropped = 0
        if rewind is not None:
            # Versions above the fork point now name other weights: whatever they generated is void.
            dropped = self.ledger.drop_where(lambda r: r.max_version > rewind, "generated by an abandoned lineage")
            self._unreported_drops += dropped
        self._parked.clear()
        self.updates.abandon("a new learner session started")
        self._save_meta()
        self.log.info("learner session started", session=hello.session, version=hello.loaded_version,
                      committed_version=hello.committed_version, previous_latest=previous, rewound=rewind is not None,
                      leases_consumed=consumed, leases_returned=returned, dropped_abandoned_lineage=dropped)

    # ------------------------------------------------------------------ rollouts

    def _on_submit(self, peer: Peer, msg_id: str, rollouts: list[Rollout], out: list[Outgoing],
                   raw: list[msgspec.Raw] | None = None, max_token_id: int | None = None) -> None:
        """`raw`: each rollout's bytes as received (wire.Message.raw_rollouts), journaled as they are;
        `max_token_id`: their largest token id, as the decoder found it (wire.Message.max_token_id)."""
        if self.book.actor_version(peer.peer_id) is None:
            self._count("rollouts_refused_not_ready", len(rollouts))
            out.append(Outgoing(peer.identity, Ack(
                acked=[], retry=[r.rollout_id for r in rollouts],
                retry_reason=f"not ready: load version {self.book.latest_version} of the current lineage first"),
                msg_id))
            return
        invalid: list[RolloutRejection] = []
        problems = self.rules.problems(rollouts, peer.peer_id, self.book.latest_version, max_token_id)
        if raw is None or len(raw) != len(rollouts):
            raw = None
        if not any(problems):
            valid, valid_raw = rollouts, raw
        else:
            valid, valid_raw = [], ([] if raw is not None else None)
            for i, (rollout, problem) in enumerate(zip(rollouts, problems, strict=True)):
                if problem is None:
                    valid.append(rollout)
                    if valid_raw is not None:
                        valid_raw.append(raw[i])
                else:
                    invalid.append(RolloutRejection(rollout_id=rollout.rollout_id, reason=problem))
        if invalid:
            self._count("rollouts_invalid", len(invalid))
            self.log.warning("refused invalid rollouts", peer=peer.peer_id, count=len(invalid),
                             first=invalid[0].reason)
        stale: list[Rollout] = []
        if self.policy.mode == "stop_the_world":
            fresh, stale = self._split_stale_on_arrival(valid)
            if stale and valid_raw is not None:
                # Kept by position, not by rollout id: one message may carry an id twice with
                # different bytes (the second is a duplicate).
                stale_at = {id(rollout) for rollout in stale}
                valid_raw = [data for rollout, data in zip(valid, valid_raw, strict=True) if id(rollout) not in stale_at]
            valid = fresh
        self._note_deliveries(peer.peer_id, valid + stale if stale else valid)
        result = self.ledger.store(valid, valid_raw)
        dropped = self.ledger.drop_on_arrival(stale, "stale on arrival (stop_the_world)")
        self._unreported_drops += len(dropped.stored)
        if result.stored:
            now = self.clock()
            self._rate.append((now, len(result.stored)))
            # Pruned here too, not only when a Status is asked for: unasked, it grew by one entry
            # per message for as long as the broker ran.
            while now - self._rate[0][0] > RATE_WINDOW_S:
                self._rate.popleft()
        if result.refused:
            self._count("rollouts_refused_full", len(result.refused))
        acked = result.stored + result.duplicates + dropped.stored + dropped.duplicates
        out.append(Outgoing(peer.identity, Ack(
            acked=acked, duplicates=len(result.duplicates) + len(dropped.duplicates),
            dropped_stale=len(dropped.stored), retry=result.refused,
            retry_reason=(f"buffer full ({self.ledger.depth}/{self.cfg.buffer_capacity})" if result.refused else ""),
            invalid=invalid), msg_id))

    def _note_deliveries(self, actor_id: str, rollouts: list[Rollout]) -> None:
        """Each group's first arrival uses up one of the actor's generation grants."""
        for rollout in rollouts:
            gid = rollout.group_id
            if gid in self._delivered_groups or self.ledger.known(rollout.rollout_id):
                continue
            self._delivered_groups[gid] = None
            if len(self._delivered_groups) > 4 * self.cfg.buffer_capacity + 1024:
                self._delivered_groups.popitem(last=False)
            self.admission.delivered(actor_id)

    def _split_stale_on_arrival(self, rollouts: list[Rollout]) -> tuple[list[Rollout], list[Rollout]]:
        """stop_the_world: a rollout with a token older than the latest version, or of two versions, is
        stale the moment it arrives; its group goes whole (buffered members included)."""
        latest = self.book.latest_version
        keep, stale = [], []
        for rollout in rollouts:
            gid = rollout.group_id
            mixed = rollout.num_completion_tokens and rollout.min_version != rollout.max_version
            if gid in self._stale_groups or mixed or is_stale(rollout.min_version, latest, 0):
                if gid not in self._stale_groups and not self.ledger.known(rollout.rollout_id):
                    self._stale_groups.add(gid)
                    self._unreported_drops += self.ledger.drop_groups([gid], "stale on arrival (stop_the_world)")
                stale.append(rollout)
            else:
                keep.append(rollout)
        return keep, stale

    # ------------------------------------------------------------------ batches

    def _on_batch_request(self, peer: Peer, msg_id: str, req: BatchRequest, out: list[Outgoing]) -> None:
        if peer.session != self.book.session:
            out.extend(self._error(peer.identity, "rejected",
                                   f"session {peer.session!r} was superseded by {self.book.session!r}", msg_id))
            return
        if req.size > self.cfg.buffer_capacity:
            out.extend(self._error(peer.identity, "rejected", f"size {req.size} exceeds what the buffer can ever "
                                   f"hold (broker.buffer_capacity={self.cfg.buffer_capacity})", msg_id))
            return
        low, high = self.book.latest_version, self.book.latest_version + self.policy.publish_interval
        if not low <= req.learner_version <= high:
            out.extend(self._error(peer.identity, "rejected", f"learner_version {req.learner_version} is outside "
                                   f"[{low}, {high}] (latest published {low}, publish interval "
                                   f"{self.policy.publish_interval})", msg_id))
            return
        self.book.learner_version = max(self.book.learner_version, req.learner_version)
        self._parked[peer.peer_id] = ParkedBatch(peer.identity, msg_id, peer.session, req)

    def _serve_batches(self, out: list[Outgoing]) -> None:
        for peer_id in list(self._parked):
            parked = self._parked[peer_id]
            req = parked.request
            lease = self.ledger.leases.get(lease_key(parked.session, req.rank, req.seq))
            if lease is None:
                # Staleness is judged when a batch is served: rollouts that arrived while the
                # request waited may be too old by now. The scan runs only when the oldest
                # buffered token is stale (a scan per message was the broker's main cost).
                oldest = self.ledger.buffer.oldest_version()
                dropped = 0
                if oldest is not None and is_stale(oldest, req.learner_version, req.max_lag):
                    dropped = self.ledger.drop_where(
                        lambda r, v=req.learner_version, lag=req.max_lag: is_stale(r.min_version, v, lag),
                        "older than max_lag when served")
                if dropped:
                    self._unreported_drops += dropped
                    self.log.info("dropped stale rollouts", count=dropped, learner_version=req.learner_version,
                                  max_lag=req.max_lag)
                lease = self.ledger.lease(parked.session, req.rank, req.seq, req.learner_version, req.size)
            if lease is None:
                continue  # not enough yet; other ranks' smaller requests may still be served
            del self._parked[peer_id]
            out.append(Outgoing(parked.identity, RolloutBatch(
                seq=req.seq, learner_version=lease.step, rollouts=lease.rollouts,
                dropped_stale=self._unreported_drops), parked.msg_id))
            self._unreported_drops = 0

    # ------------------------------------------------------------------ weights

    def _learner_rank0(self, peer: Peer, msg_id: str, out: list[Outgoing], what: str) -> bool:
        if peer.rank != 0 or peer.session != self.book.session:
            out.extend(self._error(peer.identity, "forbidden",
                                   f"only learner rank 0 of the current session may {what}", msg_id))
            return False
        return True

    def _on_publish(self, peer: Peer, msg_id: str, req: PublishRequest, out: list[Outgoing]) -> None:
        if not self._learner_rank0(peer, msg_id, out, "publish weights"):
            return
        if req.version < self.book.latest_version:
            out.extend(self._error(peer.identity, "rejected", f"version {req.version} is older than the "
                                   f"published {self.book.latest_version}", msg_id))
            return
        if req.version > self.book.latest_version and self.policy.mode == "stop_the_world":
            self._stale_groups.clear()
            dropped = self.ledger.drop_where(lambda r: is_stale(r.min_version, req.version, 0),
                                             "older than the latest version (stop_the_world)")
            self._unreported_drops += dropped
        self.book.latest_version = req.version
        self.book.learner_version = max(self.book.learner_version, req.version)
        epoch_before = self.updates.epoch_counter
        self.updates.on_publish_request(peer, msg_id, req, self.members.actors(), self.book, self._sender(out))
        self._save_meta()
        if self.updates.epoch_counter != epoch_before:
            self._count("epochs")

    def _on_update_report(self, peer: Peer, report: UpdateReport) -> None:
        upd = self.updates.in_flight
        current = upd is not None and (upd.version, upd.epoch) == (report.version, report.epoch)
        if peer.role == "actor" and report.ok and current and peer.peer_id in upd.awaiting:
            self.book.record(peer.peer_id, self.book.session, report.version)
        self.updates.on_report(peer, report.version, report.epoch, report.ok, report.error, self.book)

    def _on_commit(self, peer: Peer, msg_id: str, commit: Commit, out: list[Outgoing]) -> None:
        if not self._learner_rank0(peer, msg_id, out, "commit"):
            return
        consumed = self.ledger.commit(peer.session, commit.version)
        self.committed_version = max(self.committed_version, commit.version)
        self._save_meta()
        self.log.info("checkpoint committed", version=commit.version, consumed=consumed,
                      leased_left=self.ledger.leased)
        out.append(Outgoing(peer.identity, CommitAck(version=commit.version, consumed=consumed), msg_id))


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
