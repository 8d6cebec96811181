"""The actor's and the learner's broker links against a real BrokerServer loop over the in-process
transport (fast, no sockets): delivery, backpressure, grants, leases, publishing, broker restarts."""

from __future__ import annotations

import threading

import pytest
from test_broker_helpers import make_rollout

from tether.actor.broker_link import ActorLink, Backpressure
from tether.broker.journal import Journal
from tether.broker.ledger import Ledger
from tether.broker.server import BrokerServer
from tether.broker.state import BrokerState, RunPolicy
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import StatusRequest, TensorSpec
from tether.common.peer import BrokerConnection, BrokerError
from tether.common.transport import ClientTransport, InProcHub
from tether.learner.broker_link import LearnerLink

TENSORS = [TensorSpec(name="w", shape=(4,), dtype="float32")]
POLICY = RunPolicy(group_size=1, rollouts_per_step=2, max_lag=4, max_tokens=16)


class Broker:
    """A BrokerServer thread on an in-process hub (optionally on a journal, to restart it)."""

    def __init__(self, hub: InProcHub, journal=None, policy: RunPolicy = POLICY, **overrides) -> None:
        self.cfg = BrokerConfig(**{"heartbeat_interval_s": 0.2, "peer_timeout_s": 2.0, **overrides})
        ledger = Ledger(self.cfg.buffer_capacity, dedup_window=1000,
                        journal=Journal(journal, fsync="never") if journal else None)
        self.state = BrokerState(self.cfg, policy, ledger=ledger)
        self.server = BrokerServer(self.cfg, self.state, hub.server())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        if self.state.ledger.journal is not None:
            self.state.ledger.journal.close()


class Lossy(ClientTransport):
    """Drops the first `drop` rollout messages and sends every other rollout message twice."""

    def __init__(self, inner: ClientTransport, drop: int) -> None:
        self.inner, self.drop, self.dropped = inner, drop, 0

    def send(self, data: bytes) -> bool:
        if wire.decode_envelope(data).kind == "submit_rollouts":
            if self.dropped < self.drop:
                self.dropped += 1
                return True
            self.inner.send(data)
        return self.inner.send(data)

    def recv(self, timeout):
        return self.inner.recv(timeout)

    def close(self):
        self.inner.close()


@pytest.fixture
def hub():
    return InProcHub()


@pytest.fixture
def broker(hub):
    b = Broker(hub)
    yield b
    b.stop()


def actor(hub, peer_id="a0", transport=None, **kw) -> ActorLink:
    kw.setdefault("resend_interval_s", 0.3)
    conn = BrokerConnection(transport or hub.client(), peer_id=peer_id, heartbeat_interval_s=0.2)
    return ActorLink(conn, **kw)


def learner(hub, rank=0, session="s1", version=0, committed=-1) -> LearnerLink:
    conn = BrokerConnection(hub.client(), peer_id=f"L{rank}", heartbeat_interval_s=0.2)
    return LearnerLink(conn, rank=rank, session=session, version=lambda: version,
                       committed_version=lambda: committed, resend_interval_s=0.5)


def test_registration_and_a_status_request_without_it(hub, broker):
    a0 = actor(hub)
    try:
        welcome = a0.register(timeout=10)
        assert welcome.ready and welcome.broker_incarnation == broker.state.incarnation
        with BrokerConnection(hub.client(), peer_id="tool") as tool:
            status = tool.request(StatusRequest(), timeout=10)
        assert [p.peer_id for p in status.peers] == ["a0"]
    finally:
        a0.conn.close()


def test_rollouts_are_delivered_once_despite_drops_and_duplicates(hub, broker):
    a0 = actor(hub, transport=Lossy(hub.client(), drop=2))
    try:
        a0.register(timeout=10)
        a0.send_rollouts([make_rollout(f"r{i}", f"g{i}") for i in range(3)])
        a0.send_rollouts([make_rollout("r3", "g3")])
        assert a0.unacked_count > 0  # the first sends were dropped
        assert a0.flush(timeout=10)
        assert a0.conn.transport.dropped == 2 and a0.acked_total == 4
    finally:
        a0.conn.close()
    assert broker.state.ledger.depth == 4 and broker.state.ledger.stored_total == 4


def test_backpressure_bounds_unacked_rollouts(hub, broker):
    a0 = actor(hub, max_unacked=2)
    try:
        # Not registered yet: nothing can be acked, so the bound is hit deterministically.
        a0.send_rollouts([make_rollout("r0"), make_rollout("r1", "g1")])
        with pytest.raises(Backpressure):
            a0.send_rollouts([make_rollout("r2", "g2")])
        assert a0.unacked_count == 2
        a0.register(timeout=10)
        assert a0.wait_for_capacity(1, timeout=10)
        a0.send_rollouts([make_rollout("r2", "g2")])
        assert a0.flush(timeout=10)
    finally:
        a0.conn.close()


def test_invalid_rollouts_are_dropped_counted_and_never_resent(hub, broker):
    a0 = actor(hub)
    try:
        a0.register(timeout=10)
        a0.send_rollouts([make_rollout("ok"), make_rollout("forged", "g1", actor_id="someone-else")])
        assert a0.flush(timeout=10)
        assert a0.acked_total == 1 and a0.invalid_total == 1
    finally:
        a0.conn.close()
    assert broker.state.ledger.stored_total == 1


def test_generation_grants_wait_for_the_learner_to_make_room(hub):
    b = Broker(hub, policy=RunPolicy(group_size=1, rollouts_per_step=2, max_lag=0))
    a0, l0 = actor(hub), learner(hub)
    try:
        l0.register(timeout=10)
        a0.register(timeout=10)
        assert a0.acquire_group(wanted=5, timeout=10) and a0.acquire_group(wanted=5, timeout=10)
        assert not a0.acquire_group(wanted=5, timeout=0.5)  # two outstanding: a step's worth
        a0.send_rollouts([make_rollout("r0", "g0"), make_rollout("r1", "g1")])
        assert a0.flush(timeout=10)
        l0.request_batch(size=2, learner_version=0, max_lag=0)
        assert l0.poll_batch(timeout=10) is not None
        assert a0.acquire_group(wanted=5, timeout=10)  # granted as soon as the batch left
    finally:
        a0.conn.close(), l0.conn.close(), b.stop()


def test_learner_batches_publish_and_commit(hub, broker):
    a0, l0 = actor(hub, worker_count=2), learner(hub)
    a0.conn.start(), l0.conn.start()
    try:
        l0.register(timeout=10)
        a0.register(timeout=10)
        a0.send_rollouts([make_rollout("x0", "gx"), make_rollout("y0", "gy")])
        l0.request_batch(size=2, learner_version=0, max_lag=4)
        batch = l0.poll_batch(timeout=10)
        assert batch is not None and sorted(r.rollout_id for r in batch.rollouts) == ["x0", "y0"]
        update = l0.publish(1, TENSORS, bucket_bytes=1 << 20, timeout=10)
        assert update is not None and (update.version, update.first_rank, update.world_size) == (1, 0, 3)
        received = a0.next_update(timeout=10)
        assert received is not None and (received.version, received.epoch, received.first_rank) == (1, update.epoch, 1)
        assert l0.publish(2, TENSORS, bucket_bytes=1 << 20, timeout=10) is None  # deferred: 1 is in flight
        a0.report_update(1, update.epoch, ok=True)
        l0.report_update(update, ok=True, seconds=0.1)
        assert l0.conn.wait_until(l0.publish_wanted, 10)  # a0 holds 1, the latest is 2
        l0.commit(1)
        assert l0.conn.wait_until(lambda: l0.commit_pending is None, 10)
        assert broker.state.ledger.consumed_total == 2
    finally:
        a0.conn.close(), l0.conn.close()


def test_refused_batch_requests_raise(hub, broker):
    l0 = learner(hub)
    try:
        l0.register(timeout=10)
        l0.request_batch(size=10**6, learner_version=0, max_lag=4)
        with pytest.raises(BrokerError) as info:
            l0.poll_batch(timeout=10)
        assert info.value.code == "rejected" and "buffer_capacity" in str(info.value)
    finally:
        l0.conn.close()


def test_a_broker_restart_loses_nothing_and_peers_come_back_by_themselves(hub, tmp_path):
    journal = tmp_path / "journal.bin"
    b = Broker(hub, journal=journal)
    a0, l0 = actor(hub), learner(hub)
    a0.conn.start(), l0.conn.start()
    try:
        l0.register(timeout=10)
        a0.register(timeout=10)
        a0.send_rollouts([make_rollout("r0", "g0"), make_rollout("r1", "g1")])
        assert a0.flush(timeout=10)
        b.stop()  # the broker dies with two acked rollouts buffered
        a0.send_rollouts([make_rollout("r2", "g2")])  # sent into the void
        l0.request_batch(size=3, learner_version=0, max_lag=4)  # parked nowhere
        b = Broker(hub, journal=journal)  # a fresh process on the same journal knows nobody
        batch = l0.poll_batch(timeout=15)
        assert batch is not None and sorted(r.rollout_id for r in batch.rollouts) == ["r0", "r1", "r2"]
        assert a0.conn.registrations >= 2 and l0.conn.registrations >= 2
        assert b.state.ledger.stored_total == 3 and b.state.ledger.leased == 3
    finally:
        a0.conn.close(), l0.conn.close(), b.stop()
