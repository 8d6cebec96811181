"""Fast unit tests of the broker's pure state machine and buffer (no sockets, fake clock)."""

from __future__ import annotations

import msgspec
import pytest
from test_broker_helpers import FakeClock, make_rollout

from tether.broker.buffer import RolloutBuffer
from tether.broker.journal import Journal
from tether.broker.state import BrokerState
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import (
    Ack,
    BatchRequest,
    Error,
    Heartbeat,
    Hello,
    RolloutBatch,
    Status,
    StatusRequest,
    TensorSpec,
    VersionAck,
    WeightsAnnounce,
)

TENSORS = [TensorSpec(name="w", shape=(2, 2), dtype="float32")]


class Harness:
    def __init__(self, **overrides) -> None:
        self.clock = FakeClock()
        self.cfg = BrokerConfig(**{"peer_timeout_s": 5.0, "update_timeout_s": 10.0, "buffer_capacity": 64, **overrides})
        self.state = BrokerState(self.cfg, clock=self.clock)

    def send(self, sender: str, body, msg_id: str | None = None):
        data = wire.encode(body, sender=sender, msg_id=msg_id)
        return self.state.handle(sender.encode(), data)

    def hello(self, peer: str, role: str = "actor", workers: int = 1, loaded: int = 0, pid: int = 1):
        return self.send(peer, Hello(peer_id=peer, role=role, worker_count=workers, loaded_version=loaded, pid=pid))


def bodies(out, cls=None, to: str | None = None):
    return [o.body for o in out if (cls is None or isinstance(o.body, cls)) and (to is None or o.peer == to.encode())]


def test_hello_is_answered_with_status_under_the_request_id():
    h = Harness()
    out = h.send("a0", Hello(peer_id="a0", role="actor"), msg_id="req-1")
    assert len(out) == 1 and isinstance(out[0].body, Status) and out[0].msg_id == "req-1"
    assert [p.peer_id for p in out[0].body.peers] == ["a0"]


def test_messages_before_hello_are_refused_as_not_registered():
    h = Harness()
    out = h.send("a0", Heartbeat(peer_id="a0", seq=1), msg_id="hb")
    assert bodies(out)[0] == Error(code="not_registered", message=bodies(out)[0].message, ref_msg_id="hb")


def test_hello_with_a_peer_id_other_than_the_sender_is_refused():
    h = Harness()
    out = h.send("a0", Hello(peer_id="someone-else", role="actor"))
    assert isinstance(out[0].body, Error) and out[0].body.code == "malformed"
    assert not h.state.peers


def test_silent_peer_is_declared_dead_and_must_register_again():
    h = Harness()
    h.hello("a0")
    h.hello("a1")
    h.clock.advance(3)
    h.send("a1", Heartbeat(peer_id="a1", seq=1))
    h.clock.advance(3)  # a0 silent 6 s > 5 s; a1 silent 3 s
    h.state.tick()
    assert not h.state.peers["a0"].alive and h.state.peers["a1"].alive
    out = h.send("a0", Heartbeat(peer_id="a0", seq=2))
    assert bodies(out)[0].code == "not_registered"
    h.hello("a0")
    assert h.state.peers["a0"].alive


def test_max_peers_bounds_registrations():
    h = Harness(max_peers=2)
    h.hello("a0")
    h.hello("a1")
    out = h.hello("a2")
    assert bodies(out)[0].code == "rejected" and "a2" not in h.state.peers


def test_duplicate_rollouts_are_acked_again_but_stored_once():
    h = Harness()
    h.hello("a0")
    r = make_rollout("r1")
    first = bodies(h.send("a0", RolloutBatch(rollouts=[r])), Ack)[0]
    again = bodies(h.send("a0", RolloutBatch(rollouts=[r, r])), Ack)[0]
    assert first == Ack(rollout_ids=["r1"], duplicates=0)
    assert again.rollout_ids == ["r1", "r1"] and again.duplicates == 2
    assert h.state.buffer.depth == 1 and h.state.buffer.stored_total == 1


def test_batches_hold_whole_groups_and_requests_wait_for_them():
    h = Harness()
    h.hello("a0")
    h.hello("L0", role="learner")
    h.send("a0", RolloutBatch(rollouts=[make_rollout("g1-0", "g1", 2)]))
    out = h.send("L0", BatchRequest(rank=0, size=4, learner_version=0, max_lag=4), msg_id="b1")
    assert not bodies(out, RolloutBatch)  # parked: nothing complete yet
    h.send("a0", RolloutBatch(rollouts=[make_rollout("g1-1", "g1", 2), make_rollout("g2-0", "g2", 2)]))
    out = h.send("a0", RolloutBatch(rollouts=[make_rollout("g2-1", "g2", 2), make_rollout("g3-0", "g3", 2)]))
    batch = bodies(out, RolloutBatch, to="L0")[0]
    assert sorted(r.rollout_id for r in batch.rollouts) == ["g1-0", "g1-1", "g2-0", "g2-1"]
    assert [o.msg_id for o in out if isinstance(o.body, RolloutBatch)] == ["b1"]
    assert h.state.buffer.depth == 1  # the incomplete g3 stays


def test_consumed_rollouts_are_still_deduplicated():
    h = Harness()
    h.hello("a0")
    h.hello("L0", role="learner")
    h.send("a0", RolloutBatch(rollouts=[make_rollout("r1")]))
    assert bodies(h.send("L0", BatchRequest(rank=0, size=1, learner_version=0, max_lag=1)), RolloutBatch)
    ack = bodies(h.send("a0", RolloutBatch(rollouts=[make_rollout("r1")])), Ack)[0]
    assert ack.duplicates == 1 and h.state.buffer.depth == 0


def test_stale_groups_are_dropped_counted_and_reported():
    h = Harness()
    h.hello("a0")
    h.hello("L0", role="learner")
    h.send("a0", RolloutBatch(rollouts=[make_rollout("old-0", "old", 2, version=1), make_rollout("old-1", "old", 2, version=3)]))
    h.send("a0", RolloutBatch(rollouts=[make_rollout("new-0", "new", 2, version=3), make_rollout("new-1", "new", 2, version=4)]))
    out = h.send("L0", BatchRequest(rank=0, size=2, learner_version=4, max_lag=2))
    batch = bodies(out, RolloutBatch)[0]
    assert [r.group_id for r in batch.rollouts] == ["new", "new"]
    assert batch.dropped_stale == 2
    assert h.state.status().dropped_stale_total == 2


def test_a_waiting_request_is_never_served_rollouts_that_arrived_stale():
    """Staleness is judged when the batch is served: rollouts resent from an actor's queue while the
    learner waited must not reach it (seen end to end: they were served and dropped by the learner)."""
    h = Harness()
    h.hello("a0")
    h.hello("L0", role="learner")
    assert not bodies(h.send("L0", BatchRequest(rank=0, size=2, learner_version=4, max_lag=2), msg_id="b1"), RolloutBatch)
    out = h.send("a0", RolloutBatch(rollouts=[make_rollout("old-0", "old", 2, version=1),
                                              make_rollout("old-1", "old", 2, version=1)]))
    assert not bodies(out, RolloutBatch)  # too old for the waiting request: dropped, not served
    out = h.send("a0", RolloutBatch(rollouts=[make_rollout("new-0", "new", 2, version=2),
                                              make_rollout("new-1", "new", 2, version=3)]))
    batch = bodies(out, RolloutBatch, to="L0")[0]
    assert [r.group_id for r in batch.rollouts] == ["new", "new"] and batch.dropped_stale == 2


def test_full_buffer_refuses_new_groups_with_rejected_but_admits_open_groups():
    h = Harness(buffer_capacity=2)
    h.hello("a0")
    h.send("a0", RolloutBatch(rollouts=[make_rollout("a-0", "a", 2), make_rollout("b-0", "b", 3)]))
    out = h.send("a0", RolloutBatch(rollouts=[make_rollout("c-0", "c", 1), make_rollout("b-1", "b", 3)]), msg_id="m")
    ack = bodies(out, Ack)[0]
    err = bodies(out, Error)[0]
    assert ack.rollout_ids == ["b-1"]
    assert err.code == "rejected" and err.ref_msg_id == "m" and "retry" in err.message
    assert not h.state.buffer.seen("c-0")


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x00\x01garbage", "malformed"),
        (msgspec.msgpack.encode({"kind": "hello", "schema": 999, "sender": "x", "msg_id": "m", "body": {}}), "schema_mismatch"),
        (msgspec.msgpack.encode({"kind": "nope", "schema": 1, "sender": "x", "msg_id": "m", "body": {}}), "unknown_kind"),
        (msgspec.msgpack.encode({"kind": "hello", "schema": 1, "sender": "x", "msg_id": "m", "body": {"peer_id": 3}}), "malformed"),
        (None, "malformed"),
    ],
)
def test_bad_input_gets_an_error_and_a_counter(data, code):
    h = Harness()
    out = h.state.handle(b"evil", data)
    assert len(out) == 1 and out[0].peer == b"evil" and out[0].body.code == code
    assert h.state.counters[f"error_{code}"] == 1


def test_oversized_message_is_refused_as_too_large():
    h = Harness(max_message_bytes=2048)
    out = h.state.handle(b"evil", b"\x00" * 4096)
    assert out[0].body.code == "too_large"


def test_broker_only_messages_are_refused_from_peers():
    h = Harness()
    h.hello("a0")
    out = h.send("a0", Ack(rollout_ids=[]))
    assert out[0].body.code == "malformed"


def test_status_request_needs_no_hello_and_reports_versions_and_lag():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0", loaded=0)
    h.send("L0", WeightsAnnounce(version=3, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    out = h.send("tool", StatusRequest(), msg_id="s")
    status = out[0].body
    assert out[0].msg_id == "s" and status.latest_version == 3
    assert {p.peer_id: p.lag for p in status.peers} == {"a0": 3, "L0": 0}


# ----------------------------------------------------------------------------- weight updates


def test_announce_without_actors_says_world_size_one():
    h = Harness()
    h.hello("L0", role="learner")
    out = h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024), msg_id="go")
    go = bodies(out, WeightsAnnounce, to="L0")[0]
    assert go.group_world_size == 1 and out[0].msg_id == "go" and h.state.latest_version == 1
    assert h.state.update is None


def test_announce_forms_an_epoch_assigns_ranks_and_completes_on_acks():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0", workers=2)
    h.hello("a1", workers=1)
    out = h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    anns = {o.peer.decode(): o.body for o in out if isinstance(o.body, WeightsAnnounce)}
    assert {k: (a.epoch, a.first_rank, a.group_world_size) for k, a in anns.items()} == {
        "L0": (1, 0, 4), "a0": (1, 1, 4), "a1": (1, 3, 4)}
    assert anns["a0"].group_port == h.cfg.store_port and anns["a0"].tensors == TENSORS
    h.send("a0", VersionAck(peer_id="a0", version=1, epoch=1))
    assert h.state.update is not None
    h.send("a1", VersionAck(peer_id="a1", version=1, epoch=1))
    assert h.state.update is None
    assert {p.peer_id: p.loaded_version for p in h.state.status().peers} == {"L0": 1, "a0": 1, "a1": 1}
    out = h.send("L0", WeightsAnnounce(version=2, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    assert {o.body.epoch for o in out} == {1}  # same members: the epoch (and its group) is reused


def test_next_announce_waits_until_the_update_in_flight_completes():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0")
    h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    out = h.send("L0", WeightsAnnounce(version=2, epoch=0, tensors=TENSORS, bucket_bytes=1024), msg_id="v2")
    assert not out
    out = h.send("a0", VersionAck(peer_id="a0", version=1, epoch=1))
    assert [(o.body.version, o.msg_id) for o in out if o.peer == b"L0"] == [(2, "v2")]


def test_update_timeout_reforms_the_epoch_without_the_silent_actor():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0")
    h.hello("a1")
    h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    h.send("a0", VersionAck(peer_id="a0", version=1, epoch=1))
    for seq in range(3):  # everyone stays alive; a1 never acks
        h.clock.advance(3.5)
        for peer in ("a0", "a1", "L0"):
            h.send(peer, Heartbeat(peer_id=peer, seq=seq))
    out = h.state.tick()  # 10.5 s after the announce: past update_timeout_s
    anns = {o.peer.decode(): o.body for o in out if isinstance(o.body, WeightsAnnounce)}
    assert set(anns) == {"L0", "a0"}
    assert {(a.version, a.epoch, a.group_world_size) for a in anns.values()} == {(1, 2, 2)}
    h.send("a0", VersionAck(peer_id="a0", version=1, epoch=2))
    assert h.state.update is None


def test_member_death_during_update_resends_to_survivors():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0")
    h.hello("a1")
    h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    h.clock.advance(3)
    h.send("a0", Heartbeat(peer_id="a0", seq=1))
    h.send("L0", Heartbeat(peer_id="L0", seq=1))
    h.clock.advance(3)  # a1 silent 6 s: dead, update deadline (10 s) not reached yet
    out = h.state.tick()
    assert not h.state.peers["a1"].alive
    assert {o.peer.decode() for o in out if isinstance(o.body, WeightsAnnounce)} == {"L0", "a0"}
    assert h.state.epoch.number == 2 and h.state.epoch.world_size == 2


def test_failed_load_reforms_immediately():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0")
    h.hello("a1")
    h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    out = h.send("a1", VersionAck(peer_id="a1", version=1, epoch=1, ok=False, error="oom"))
    assert {o.peer.decode() for o in out if isinstance(o.body, WeightsAnnounce)} == {"L0", "a0"}


def test_joining_actor_triggers_republish_and_is_not_ready_until_it_loads():
    h = Harness()
    h.hello("L0", role="learner")
    h.hello("a0")
    h.send("L0", WeightsAnnounce(version=1, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    h.send("a0", VersionAck(peer_id="a0", version=1, epoch=1))
    out = h.hello("a1", loaded=0)
    anns = {o.peer.decode(): o.body for o in out if isinstance(o.body, WeightsAnnounce)}
    assert set(anns) == {"L0", "a0", "a1"}
    assert {(a.version, a.epoch, a.group_world_size) for a in anns.values()} == {(1, 2, 3)}
    refused = h.send("a1", RolloutBatch(rollouts=[make_rollout("x", actor_id="a1")]))
    assert bodies(refused)[0].code == "rejected" and "not ready" in bodies(refused)[0].message
    h.send("a1", VersionAck(peer_id="a1", version=1, epoch=2))
    h.send("a0", VersionAck(peer_id="a0", version=1, epoch=2))
    assert h.state.peers["a1"].ready and h.state.update is None
    assert bodies(h.send("a1", RolloutBatch(rollouts=[make_rollout("x", actor_id="a1")])), Ack)


def test_actor_holding_the_latest_version_joins_without_republish():
    h = Harness()
    h.hello("L0", role="learner")
    h.send("L0", WeightsAnnounce(version=2, epoch=0, tensors=TENSORS, bucket_bytes=1024))
    out = h.hello("a0", loaded=2)
    assert not bodies(out, WeightsAnnounce) and h.state.peers["a0"].ready


# ----------------------------------------------------------------------------- buffer and journal


def test_oversize_group_is_served_alone():
    buf = RolloutBuffer(16)
    buf.add([make_rollout(f"r{i}", "big", 3) for i in range(3)])
    assert len(buf.take(2)) == 3


def test_journal_restores_only_unconsumed_rollouts(tmp_path):
    path = tmp_path / "j.log"
    buf = RolloutBuffer(16, journal=Journal(path, fsync="never"))
    buf.add([make_rollout("a"), make_rollout("b", "gb"), make_rollout("c", "gc")])
    assert [r.rollout_id for r in buf.take(1)] == ["a"]
    buf.journal.close()
    again = RolloutBuffer(16, journal=Journal(path, fsync="never"))
    assert again.replay_journal() == 2
    assert again.seen("a") and again.depth == 2
    assert [r.rollout_id for r in again.take(2)] == ["b", "c"]


def test_journal_truncates_a_torn_tail(tmp_path):
    path = tmp_path / "j.log"
    buf = RolloutBuffer(16, journal=Journal(path, fsync="always"))
    buf.add([make_rollout("a"), make_rollout("b", "gb")])
    buf.journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])  # kill -9 in the middle of the second record
    again = RolloutBuffer(16, journal=Journal(path, fsync="never"))
    assert again.replay_journal() == 1 and again.seen("a") and not again.seen("b")
    again.add([make_rollout("c", "gc")])
    again.journal.close()
    third = RolloutBuffer(16, journal=Journal(path, fsync="never"))
    assert third.replay_journal() == 2 and third.seen("c")
