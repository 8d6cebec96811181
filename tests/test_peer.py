"""BrokerClient against a real BrokerServer loop over the in-process transport (fast, no sockets)."""

from __future__ import annotations

import threading

import pytest
from test_broker_helpers import make_rollout

from tether.broker.server import BrokerServer
from tether.broker.state import BrokerState
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import TensorSpec
from tether.common.peer import Backpressure, BrokerClient, BrokerError
from tether.common.transport import ClientTransport, InProcHub

TENSORS = [TensorSpec(name="w", shape=(4,), dtype="float32")]


class Broker:
    """A BrokerServer thread on an in-process hub."""

    def __init__(self, hub: InProcHub, **overrides) -> None:
        self.cfg = BrokerConfig(**{"heartbeat_interval_s": 0.2, "peer_timeout_s": 2.0, **overrides})
        self.state = BrokerState(self.cfg)
        self.server = BrokerServer(self.cfg, self.state, hub.server())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)


class Lossy(ClientTransport):
    """Drops the first `drop` rollout messages and sends every other rollout message twice."""

    def __init__(self, inner: ClientTransport, drop: int) -> None:
        self.inner, self.drop, self.dropped = inner, drop, 0

    def send(self, data: bytes) -> bool:
        if wire.decode_envelope(data).kind == "rollout_batch":
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


def client(hub, peer_id, role="actor", transport=None, **kw) -> BrokerClient:
    kw.setdefault("heartbeat_interval_s", 0.2)
    kw.setdefault("resend_interval_s", 0.3)
    return BrokerClient(transport or hub.client(), peer_id=peer_id, role=role, **kw)


def test_hello_and_status(hub, broker):
    with client(hub, "a0") as a0:
        status = a0.hello(loaded_version=0)
        assert [p.peer_id for p in status.peers] == ["a0"]
        assert a0.status().peers[0].alive


def test_rollouts_are_delivered_once_despite_drops_and_duplicates(hub, broker):
    with client(hub, "a0", transport=Lossy(hub.client(), drop=2)) as a0:
        a0.hello(loaded_version=0)
        a0.send_rollouts([make_rollout(f"r{i}", f"g{i}") for i in range(3)])
        a0.send_rollouts([make_rollout("r3", "g3")])
        assert a0.unacked_count > 0  # the first sends were dropped
        assert a0.flush(timeout=10)
        assert a0.transport.dropped == 2
    assert broker.state.buffer.depth == 4 and broker.state.buffer.stored_total == 4
    assert broker.state.buffer.duplicates_total >= 1


def test_backpressure_bounds_unacked_rollouts(hub, broker):
    with client(hub, "a0", max_unacked=2) as a0:
        # Not registered yet: nothing can be acked, so the bound is hit deterministically.
        a0.send_rollouts([make_rollout("r0"), make_rollout("r1", "g1")])
        with pytest.raises(Backpressure):
            a0.send_rollouts([make_rollout("r2", "g2")])
        assert a0.unacked_count == 2
        a0.hello(loaded_version=0)
        assert a0.wait_for_capacity(1, timeout=10)
        a0.send_rollouts([make_rollout("r2", "g2")])
        assert a0.flush(timeout=10)


def test_full_broker_buffer_makes_the_actor_keep_and_resend(hub):
    b = Broker(hub, buffer_capacity=2)
    try:
        with client(hub, "a0") as a0, client(hub, "L0", role="learner") as learner:
            a0.hello(loaded_version=0)
            learner.hello()
            a0.send_rollouts([make_rollout(f"r{i}", f"g{i}") for i in range(4)])
            a0.poll(0.5)
            assert a0.unacked_count == 2
            assert any(e.code == "rejected" for e in a0.errors)
            first = learner.request_batch(rank=0, size=2, learner_version=0, max_lag=4, timeout=10)
            assert first is not None and len(first.rollouts) == 2
            assert a0.flush(timeout=10)  # resent after the learner made room
            second = learner.request_batch(rank=0, size=2, learner_version=0, max_lag=4, timeout=10)
            ids = {r.rollout_id for r in first.rollouts + second.rollouts}
            assert ids == {"r0", "r1", "r2", "r3"}
    finally:
        b.stop()


def test_learner_batch_waits_for_whole_groups(hub, broker):
    with client(hub, "a0") as a0, client(hub, "L0", role="learner") as learner:
        a0.hello(loaded_version=0)
        learner.hello()
        a0.send_rollouts([make_rollout("x0", "gx", 2)])
        assert learner.request_batch(rank=0, size=2, learner_version=0, max_lag=4, timeout=0.5) is None
        a0.send_rollouts([make_rollout("x1", "gx", 2)])
        a0.flush(timeout=10)
        batch = learner.request_batch(rank=0, size=2, learner_version=0, max_lag=4, timeout=10)
        assert batch is not None and sorted(r.rollout_id for r in batch.rollouts) == ["x0", "x1"]


def test_weight_update_round_trip_with_background_threads(hub, broker):
    a0 = client(hub, "a0", worker_count=2).start()
    learner = client(hub, "L0", role="learner").start()
    try:
        a0.hello(loaded_version=0)
        learner.hello()
        go = learner.announce_weights(1, TENSORS, bucket_bytes=1 << 20, timeout=10)
        assert (go.version, go.first_rank, go.group_world_size) == (1, 0, 3)
        ann = a0.next_weights_announce(timeout=10)
        assert ann is not None and (ann.version, ann.epoch, ann.first_rank) == (1, go.epoch, 1)
        a0.send_version_ack(ann.version, ann.epoch, pause_seconds=0.01)
        a1 = client(hub, "a1").start()
        try:
            a1.hello(loaded_version=0)
            # The joiner makes the broker ask the learner to re-publish version 1 to a new epoch.
            again = learner.next_weights_announce(timeout=10)
            assert again is not None and again.version == 1 and again.epoch == go.epoch + 1
            assert again.group_world_size == 4
        finally:
            a1.close()
    finally:
        a0.close()
        learner.close()


def test_broker_restart_makes_the_client_register_again_and_resend(hub):
    b = Broker(hub)
    a0 = client(hub, "a0")
    try:
        a0.hello(loaded_version=0)
        b.stop()
        a0.send_rollouts([make_rollout("r0")])  # sent into the void: the broker is gone
        b2 = Broker(hub)  # a fresh broker knows nobody: it answers not_registered
        try:
            assert a0.flush(timeout=10)
            assert b2.state.buffer.seen("r0") and "a0" in b2.state.peers
        finally:
            b2.stop()
    finally:
        a0.close()


def test_request_errors_raise(hub, broker):
    with client(hub, "a0") as a0:
        a0.hello(loaded_version=0)
        with pytest.raises(BrokerError) as info:
            a0.announce_weights(1, TENSORS, bucket_bytes=1024, timeout=5)
        assert info.value.code == "rejected"
