"""Fast unit tests of the broker's pure state machine (no sockets, fake clock).

Registration and roles, rollout validation and storage, leases and commits (exactly once),
learner sessions and lineage rewinds, weight updates and their failures, admission by version,
and bad input.
"""

from __future__ import annotations

import msgspec
import pytest
from test_broker_helpers import TENSORS, Harness, addressed, balanced, bodies, group, make_rollout

from tether.broker.state import RunPolicy
from tether.common.messages import (
    Ack,
    Commit,
    CommitAck,
    Error,
    GenerationGrant,
    GenerationRequest,
    Heartbeat,
    Hello,
    PublishDeferred,
    PublishRequest,
    PublishWanted,
    RolloutBatch,
    Status,
    StatusRequest,
    SubmitRollouts,
    WeightUpdate,
    Welcome,
)

# ----------------------------------------------------------------------------- registration and roles


def test_hello_is_answered_with_welcome_under_the_request_id():
    h = Harness()
    out = h.send("a0", Hello(peer_id="a0", role="actor", incarnation="x"), msg_id="req-1")
    assert len(out) == 1 and isinstance(out[0].body, Welcome) and out[0].msg_id == "req-1"
    assert out[0].body.ready and out[0].body.broker_incarnation == h.state.incarnation


def test_messages_before_hello_are_refused_as_not_registered():
    h = Harness()
    out = h.send("a0", Heartbeat(seq=1), msg_id="hb")
    assert bodies(out)[0] == Error(code="not_registered", message=bodies(out)[0].message, ref_msg_id="hb")


def test_hello_with_a_peer_id_other_than_the_sender_is_refused():
    h = Harness()
    out = h.send("a0", Hello(peer_id="someone-else", role="actor", incarnation="x"))
    assert bodies(out)[0].code == "malformed" and not h.state.members.peers


def test_a_learner_must_name_its_session():
    h = Harness()
    out = h.send("L0", Hello(peer_id="L0", role="learner", incarnation="x"))
    assert bodies(out)[0].code == "malformed" and "session" in bodies(out)[0].message


def test_silent_peer_is_declared_dead_and_must_register_again():
    h = Harness()
    h.actor("a0")
    h.actor("a1")
    h.clock.advance(3)
    h.send("a1", Heartbeat(seq=1))
    h.tick(3)  # a0 silent 6 s > 5 s; a1 silent 3 s
    assert not h.state.members.peers["a0"].alive and h.state.members.peers["a1"].alive
    assert bodies(h.send("a0", Heartbeat(seq=2)))[0].code == "not_registered"
    h.actor("a0")
    assert h.state.members.peers["a0"].alive


def test_max_peers_bounds_registrations():
    h = Harness(max_peers=2)
    h.actor("a0")
    h.actor("a1")
    assert bodies(h.actor("a2"))[0].code == "rejected" and "a2" not in h.state.members.peers


@pytest.mark.parametrize("sender, body", [
    ("a0", PublishRequest(version=1, tensors=TENSORS, bucket_bytes=8)),
    ("a0", Commit(version=1)),
    ("L0", SubmitRollouts(rollouts=[make_rollout("r", actor_id="L0")])),
    ("L0", GenerationRequest(seq=1, groups=1)),
    ("t0", SubmitRollouts(rollouts=[make_rollout("r", actor_id="t0")])),
    ("L1", PublishRequest(version=1, tensors=TENSORS, bucket_bytes=8)),
    ("L1", Commit(version=1)),
])
def test_each_role_may_send_only_its_own_records(sender, body):
    h = Harness()
    h.actor("a0")
    h.learner(0)
    h.learner(1)
    h.send("t0", Hello(peer_id="t0", role="tool", incarnation="x"))
    out = h.send(sender, body, msg_id="m")
    assert bodies(out, Error)[0].code == "forbidden" and bodies(out, Error)[0].ref_msg_id == "m"
    assert h.state.ledger.stored_total == 0 and h.state.book.latest_version == 0


def test_curve_keys_are_bound_to_roles_and_to_the_peer_they_registered():
    h = Harness(key_roles={"ACTORKEY": frozenset({"actor"}), "LEARNERKEY": frozenset({"learner"})})
    assert bodies(h.send("x", Hello(peer_id="x", role="learner", incarnation="i"), credential="ACTORKEY"))[0].code == "forbidden"
    assert bodies(h.send("y", Hello(peer_id="y", role="actor", incarnation="i"), credential=None))[0].code == "forbidden"
    assert isinstance(bodies(h.send("a0", Hello(peer_id="a0", role="actor", incarnation="i"), credential="ACTORKEY"))[0],
                      Welcome)
    # Another authorised client cannot speak for a0.
    out = h.send("a0", SubmitRollouts(rollouts=[make_rollout("r")]), credential="LEARNERKEY")
    assert bodies(out)[0].code == "forbidden" and h.state.ledger.stored_total == 0


# ----------------------------------------------------------------------------- rollouts


def test_duplicate_rollouts_are_acked_again_but_stored_once():
    h = Harness()
    h.actor("a0")
    r = make_rollout("r1")
    first = bodies(h.submit("a0", [r]), Ack)[0]
    again = bodies(h.submit("a0", [r, r]), Ack)[0]
    assert first.acked == ["r1"] and first.duplicates == 0
    assert again.acked == ["r1", "r1"] and again.duplicates == 2
    assert h.state.ledger.depth == 1 and h.state.ledger.stored_total == 1


def test_consumed_rollouts_are_still_deduplicated():
    h = Harness()
    h.actor("a0")
    h.learner()
    h.submit("a0", [make_rollout("r1")])
    assert bodies(h.request(size=1), RolloutBatch)
    h.send("L0", Commit(version=1))
    ack = bodies(h.submit("a0", [make_rollout("r1")]), Ack)[0]
    assert ack.duplicates == 1 and h.state.ledger.depth == 0 and h.state.ledger.stored_total == 1


def test_invalid_rollouts_are_named_and_the_rest_of_the_message_is_stored():
    h = Harness(RunPolicy(group_size=2, max_tokens=4, rollouts_per_step=4, vocab_size=100))
    h.actor("a0")
    big_token = make_rollout("vocab", "gv", 2)
    big_token = msgspec.structs.replace(big_token, completion_token_ids=_ints([1, 2, 3, 100]))
    rollouts = [
        *group("ok", 2),
        make_rollout("someone-else", "gx", 2, actor_id="a9"),
        make_rollout("wrong-size", "gy", 3),
        make_rollout("too-long", "gz", 2, tokens=5),
        big_token,
        make_rollout("future", "gf", 2, version=7),
    ]
    ack = bodies(h.submit("a0", rollouts), Ack)[0]
    assert sorted(ack.acked) == ["ok-0", "ok-1"] and not ack.retry
    reasons = {r.rollout_id: r.reason for r in ack.invalid}
    assert "not the sender" in reasons["someone-else"]
    assert "group_size 3" in reasons["wrong-size"]
    assert "exceeds actor.sampling.max_tokens" in reasons["too-long"]
    assert "outside the vocabulary of 100" in reasons["vocab"]
    assert "never published" in reasons["future"]
    assert h.state.ledger.stored_total == 2 and balanced(h.state)


def _ints(values):
    from tether.common.messages import int32_array

    return int32_array(values)


def test_full_buffer_asks_to_retry_new_groups_but_admits_open_groups():
    h = Harness(RunPolicy(group_size=3, rollouts_per_step=3), buffer_capacity=3)
    h.actor("a0")
    h.submit("a0", [make_rollout("a-0", "a", 3), make_rollout("a-1", "a", 3), make_rollout("b-0", "b", 3)])
    ack = bodies(h.submit("a0", [make_rollout("c-0", "c", 3), make_rollout("b-1", "b", 3)], msg_id="m"), Ack)[0]
    assert ack.acked == ["b-1"] and ack.retry == ["c-0"] and "buffer full" in ack.retry_reason
    assert not h.state.ledger.known("c-0")


def test_an_actor_holding_no_weights_of_the_current_lineage_is_asked_to_retry():
    h = Harness()
    h.learner(version=0)
    h.publish(2)
    h.actor("a0", version=5, lineage="old-session")  # weights nobody publishes any more
    ack = bodies(h.submit("a0", [make_rollout("r")]), Ack)[0]
    assert ack.retry == ["r"] and "not ready" in ack.retry_reason and h.state.ledger.stored_total == 0


# ----------------------------------------------------------------------------- batches and leases


def test_batches_hold_whole_groups_and_requests_wait_for_them():
    h = Harness(RunPolicy(group_size=2, rollouts_per_step=4))
    h.actor("a0")
    h.learner()
    h.submit("a0", [make_rollout("g1-0", "g1", 2)])
    assert not bodies(h.request(size=4, msg_id="b1"), RolloutBatch)  # parked: nothing complete yet
    h.submit("a0", [make_rollout("g1-1", "g1", 2), make_rollout("g2-0", "g2", 2)])
    out = h.submit("a0", [make_rollout("g2-1", "g2", 2), make_rollout("g3-0", "g3", 2)])
    batch = bodies(out, RolloutBatch, to="L0")[0]
    assert sorted(r.rollout_id for r in batch.rollouts) == ["g1-0", "g1-1", "g2-0", "g2-1"]
    assert [o.msg_id for o in out if isinstance(o.body, RolloutBatch)] == ["b1"] and batch.seq == 1
    assert h.state.ledger.depth == 1 and h.state.ledger.leased == 4 and balanced(h.state)


def test_a_repeated_request_gets_the_same_lease_and_a_new_seq_a_new_one():
    h = Harness()
    h.actor("a0")
    h.learner()
    h.submit("a0", [make_rollout("r1", "g1"), make_rollout("r2", "g2")])
    first = bodies(h.request(seq=1), RolloutBatch)[0]
    again = bodies(h.request(seq=1), RolloutBatch)[0]
    assert [r.rollout_id for r in again.rollouts] == [r.rollout_id for r in first.rollouts] == ["r1"]
    second = bodies(h.request(seq=2), RolloutBatch)[0]
    assert [r.rollout_id for r in second.rollouts] == ["r2"] and h.state.ledger.leased == 2


def test_a_parked_request_that_cannot_be_served_does_not_block_others():
    h = Harness(RunPolicy(group_size=1, rollouts_per_step=8))
    h.actor("a0")
    h.learner(0)
    h.learner(1)
    assert not bodies(h.request(0, size=8), RolloutBatch)
    out = h.submit("a0", [make_rollout("r1")])
    out += h.request(1, size=1)
    assert [r.rollout_id for r in bodies(out, RolloutBatch, to="L1")[0].rollouts] == ["r1"]


def test_requests_the_buffer_can_never_hold_or_from_a_wrong_version_get_an_error():
    h = Harness(buffer_capacity=16)
    h.learner()
    too_big = bodies(h.request(size=17, msg_id="big"), Error)[0]
    assert too_big.code == "rejected" and "buffer_capacity=16" in too_big.message and too_big.ref_msg_id == "big"
    # An actor-role peer emptied the buffer as "stale" with a huge learner_version before.
    future = bodies(h.request(version=1_000_000), Error)[0]
    assert future.code == "rejected" and "outside [0, 1]" in future.message
    assert not h.state._parked


def test_stale_groups_are_dropped_counted_and_reported():
    h = Harness(RunPolicy(group_size=2, rollouts_per_step=2, max_lag=2))
    h.actor("a0")
    h.learner()
    h.publish(4)
    h.state.book.record("a0", h.state.book.session, 4)
    h.submit("a0", [make_rollout("old-0", "old", 2, version=1), make_rollout("old-1", "old", 2, version=3)])
    h.submit("a0", [make_rollout("new-0", "new", 2, version=3), make_rollout("new-1", "new", 2, version=4)])
    batch = bodies(h.request(size=2, version=4, max_lag=2), RolloutBatch)[0]
    assert [r.group_id for r in batch.rollouts] == ["new", "new"] and batch.dropped_stale == 2
    status = h.state.status()
    assert status.dropped_stale_total == 2 and balanced(h.state)


def test_a_waiting_request_is_never_served_rollouts_that_arrived_stale():
    """Staleness is judged when the batch is served: rollouts resent from an actor's queue while the
    learner waited must not reach it."""
    h = Harness(RunPolicy(group_size=2, rollouts_per_step=2, max_lag=2))
    h.actor("a0")
    h.learner()
    h.publish(4)
    assert not bodies(h.request(size=2, version=4, max_lag=2), RolloutBatch)
    out = h.submit("a0", group("old", 2, version=1))
    assert not bodies(out, RolloutBatch)  # too old for the waiting request: dropped, not served
    out = h.submit("a0", group("new", 2, version=[2, 3, 3, 3]))
    batch = bodies(out, RolloutBatch, to="L0")[0]
    assert [r.group_id for r in batch.rollouts] == ["new", "new"] and batch.dropped_stale == 2


# ----------------------------------------------------------------------------- exactly once


def test_a_commit_consumes_the_leases_of_earlier_steps_only():
    h = Harness()
    h.actor("a0")
    h.learner()
    h.submit("a0", [make_rollout(f"r{i}", f"g{i}") for i in range(3)])
    bodies(h.request(seq=1, version=0), RolloutBatch)
    h.publish(1)
    bodies(h.request(seq=2, version=1), RolloutBatch)
    ack = bodies(h.send("L0", Commit(version=1), msg_id="c"), CommitAck)[0]
    status = h.state.status()
    assert ack.consumed == 1 and status.consumed_total == 1 and status.leased == 1 and status.buffer_depth == 1
    assert status.committed_version == 1 and balanced(h.state)


def test_a_new_learner_session_gets_back_what_the_old_one_did_not_checkpoint():
    h = Harness()
    h.actor("a0")
    h.learner(session="s1")
    h.submit("a0", [make_rollout(f"r{i}", f"g{i}") for i in range(4)])
    for step in range(3):  # steps 0, 1, 2 leased; checkpoint at version 1 only covers step 0
        assert bodies(h.request(seq=step + 1, version=step), RolloutBatch)
        h.publish(step + 1)
    h.send("L0", Commit(version=1))
    assert h.state.ledger.consumed_total == 1 and h.state.ledger.leased == 2
    h.learner(session="s2", version=1, committed=1)  # the old session died after step 2
    status = h.state.status()
    assert status.leased == 0 and status.buffer_depth == 3 and status.latest_version == 1
    # What came back is served first, oldest step first.
    batch = bodies(h.request(seq=1, version=1), RolloutBatch)[0]
    assert [r.rollout_id for r in batch.rollouts] == ["r1"] and balanced(h.state)


def test_a_rewind_drops_what_the_abandoned_lineage_generated_and_voids_actor_weights():
    h = Harness()
    h.learner(session="s1")
    h.actor("a0")
    h.publish(1)
    h.report("a0", 1, 1)
    h.report("L0", 1, 1)
    h.publish(2)
    h.report("a0", 2, 1)
    h.report("L0", 2, 1)
    h.submit("a0", [make_rollout("v1", "g1", version=1), make_rollout("v2", "g2", version=[1, 2, 2, 2])])
    assert h.state.book.actor_version("a0") == 2
    out = h.learner(session="s2", version=1, committed=1)  # resumed from the checkpoint at 1
    status = h.state.status()
    assert status.latest_version == 1 and status.dropped_stale_total == 1 and status.buffer_depth == 1
    assert h.state.book.actor_version("a0") is None  # its version 2 is from the abandoned lineage
    ack = bodies(h.submit("a0", [make_rollout("v2-late", "g3", version=2)]), Ack)[0]
    assert ack.retry == ["v2-late"]  # refused until it loads the new lineage
    wanted = bodies(out + h.tick(), PublishWanted, to="L0")
    assert wanted
    update = addressed(h.publish(1), WeightUpdate)
    assert update["a0"].lineage == "s2" and update["a0"].discard_above == 1 and update["L0"].discard_above == -1
    h.report("a0", 1, update["a0"].epoch)
    assert h.state.book.actor_version("a0") == 1 and balanced(h.state)


def test_a_learner_registering_again_in_the_same_session_keeps_its_leases():
    h = Harness()
    h.actor("a0")
    h.learner(session="s1")
    h.submit("a0", [make_rollout("r1")])
    bodies(h.request(seq=1), RolloutBatch)
    h.learner(session="s1", incarnation="s1-0")  # e.g. after a broker restart
    assert h.state.ledger.leased == 1
    assert [r.rollout_id for r in bodies(h.request(seq=1), RolloutBatch)[0].rollouts] == ["r1"]


def test_incomplete_groups_of_a_dead_actor_expire_and_are_counted():
    h = Harness(RunPolicy(group_size=3, rollouts_per_step=3))
    h.actor("a0")
    h.actor("a1")
    h.submit("a0", [make_rollout("x-0", "x", 3)])
    h.submit("a1", [make_rollout("y-0", "y", 3, actor_id="a1")])
    for _ in range(8):  # a1 keeps beating, a0 died
        h.clock.advance(4.9)
        h.send("a1", Heartbeat(seq=1))
        h.state.tick()
    assert h.state.ledger.known("x-0")  # dropped ids stay known for de-duplication
    assert h.state.ledger.buffer.has_group("y") and not h.state.ledger.buffer.has_group("x")
    assert h.state.status().dropped_stale_total == 1 and balanced(h.state)


# ----------------------------------------------------------------------------- weight updates


def test_publish_without_actors_is_deferred_and_recorded():
    h = Harness()
    h.learner()
    out = h.publish(1, msg_id="p")
    assert isinstance(out[0].body, PublishDeferred) and out[0].msg_id == "p" and h.state.book.latest_version == 1
    assert h.state.updates.in_flight is None


def test_publish_forms_an_epoch_assigns_ranks_and_completes_on_every_report():
    h = Harness()
    h.learner()
    h.actor("a0", workers=2)
    h.actor("a1", workers=1)
    updates = addressed(h.publish(1, msg_id="p"), WeightUpdate)
    assert {k: (u.epoch, u.first_rank, u.world_size) for k, u in updates.items()} == {
        "L0": (1, 0, 4), "a0": (1, 1, 4), "a1": (1, 3, 4)}
    assert updates["a0"].group_port == h.cfg.store_port and updates["a0"].tensors == TENSORS
    assert len({u.group_key for u in updates.values()}) == 1 and len(updates["a0"].group_key.rsplit("/", 1)[1]) == 32
    h.report("a0", 1, 1)
    h.report("a1", 1, 1)
    assert h.state.updates.in_flight is not None  # the learner has not reported
    h.report("L0", 1, 1)
    assert h.state.updates.in_flight is None
    assert {p.peer_id: p.loaded_version for p in h.state.status().peers if p.role == "actor"} == {"a0": 1, "a1": 1}
    again = addressed(h.publish(2), WeightUpdate)
    assert {u.epoch for u in again.values()} == {1} and again["L0"].group_key == updates["L0"].group_key


def test_publish_while_an_update_is_in_flight_is_deferred_then_asked_for():
    h = Harness()
    h.learner()
    h.actor("a0")
    h.publish(1)
    assert isinstance(bodies(h.publish(2), to="L0")[0], PublishDeferred)
    h.report("L0", 1, 1)
    out = h.report("a0", 1, 1)
    assert bodies(out, PublishWanted, to="L0")  # a0 holds 1, the latest is 2: publish again


def test_a_joining_actor_makes_the_broker_ask_and_only_it_receives():
    h = Harness()
    h.learner()
    h.actor("a0")
    h.publish(1)
    h.report("a0", 1, 1)
    h.report("L0", 1, 1)
    out = h.actor("a1", version=0)
    assert bodies(out, Welcome)[0].ready  # version 0 is valid, only old
    assert bodies(out, PublishWanted, to="L0")
    updates = addressed(h.publish(1), WeightUpdate)
    assert set(updates) == {"L0", "a1"} and updates["a1"].epoch == 2 and updates["a1"].world_size == 2


def test_nudges_repeat_until_the_learner_publishes():
    h = Harness(heartbeat_interval_s=0.5)
    h.learner()
    h.publish(1)  # no actors yet: deferred
    first = bodies(h.actor("a0"), PublishWanted)
    assert first
    assert not bodies(h.tick(0.5), PublishWanted)  # rate-limited
    h.send("a0", Heartbeat(seq=1))
    h.send("L0", Heartbeat(seq=1))
    assert bodies(h.tick(0.6), PublishWanted)


def test_a_due_nudge_goes_out_with_rollout_traffic_too():
    """Rollout traffic skips the nudge check only while nobody is behind: once an actor is, the
    next message of any kind after the interval carries the nudge, as a tick would."""
    h = Harness(heartbeat_interval_s=0.5)
    h.learner()
    h.actor("a0")
    h.clock.advance(5)
    assert not bodies(h.submit("a0", [make_rollout("r0")]), PublishWanted)  # a0 holds the latest
    h.publish(1)  # a0 gets the update; it fails, so a0 is behind and nothing is in flight
    h.report("L0", 1, 1)
    assert bodies(h.report("a0", 1, 1, ok=False, error="boom"), PublishWanted, to="L0")
    assert not bodies(h.submit("a0", [make_rollout("r1")]), PublishWanted)  # rate-limited
    h.clock.advance(1.1)
    assert bodies(h.submit("a0", [make_rollout("r2")]), PublishWanted, to="L0")


def test_a_silent_member_times_out_and_is_excluded_until_it_registers_again():
    h = Harness()
    h.learner()
    h.actor("a0")
    h.actor("a1")
    h.publish(1)
    h.report("a0", 1, 1)
    h.report("L0", 1, 1)
    for seq in range(3):  # everyone stays alive; a1 never reports
        h.clock.advance(3.5)
        for peer in ("a0", "a1", "L0"):
            h.send(peer, Heartbeat(seq=seq))
    h.state.tick()
    assert h.state.updates.in_flight is None and "a1" in h.state.updates.excluded
    assert isinstance(bodies(h.publish(2), to="L0")[0], WeightUpdate)
    assert "a1" not in h.state.updates.in_flight.awaiting
    h.actor("a1")
    assert "a1" not in h.state.updates.excluded


def test_a_member_dying_mid_update_ends_it_when_the_learner_reports():
    h = Harness()
    h.learner()
    h.actor("a0")
    h.actor("a1")
    h.publish(1)
    h.report("a0", 1, 1)
    h.clock.advance(3)
    h.send("a0", Heartbeat(seq=1))
    h.send("L0", Heartbeat(seq=1))
    h.tick(3)  # a1 silent 6 s: dead
    assert h.state.updates.in_flight.awaiting == set()
    h.report("L0", 1, 1, ok=False, error="connection reset")
    assert h.state.updates.in_flight is None
    assert not bodies(h.tick(), PublishWanted)  # the survivor holds version 1: nothing to re-send


def test_a_failed_load_is_sent_again_and_repeated_failures_exclude_the_actor():
    h = Harness()
    h.learner()
    h.actor("a0")
    h.actor("a1")
    for attempt in range(3):
        updates = addressed(h.publish(1), WeightUpdate)
        epoch = updates["L0"].epoch
        if attempt == 0:
            h.report("a0", 1, epoch)
        assert set(updates) == ({"L0", "a0", "a1"} if attempt == 0 else {"L0", "a1"})
        h.report("a1", 1, epoch, ok=False, error="oom")
        out = h.report("L0", 1, epoch)
        if attempt < 2:
            assert bodies(out, PublishWanted, to="L0")
    assert "a1" in h.state.updates.excluded and not bodies(h.tick(5), PublishWanted)


def test_a_failed_broadcast_blames_nobody_and_is_retried():
    h = Harness()
    h.learner()
    h.actor("a0")
    for _ in range(4):
        epoch = addressed(h.publish(1), WeightUpdate)["L0"].epoch
        h.report("a0", 1, epoch, ok=False, error="timeout")
        out = h.report("L0", 1, epoch, ok=False, error="timeout")
        assert bodies(out, PublishWanted)
    assert not h.state.updates.excluded


# ----------------------------------------------------------------------------- admission


def _grants(out, actor="a0"):
    return sum(g.groups for g in bodies(out, GenerationGrant, to=actor))


def test_grants_never_starve_the_learner_and_stop_at_max_lag():
    # 2 rollouts a step, groups of 1, max_lag 1: outstanding may reach one step plus what is
    # consumed within the lag.
    h = Harness(RunPolicy(group_size=1, rollouts_per_step=2, max_lag=1))
    h.learner()
    h.actor("a0")
    granted = _grants(h.send("a0", GenerationRequest(seq=1, groups=10)))
    # next step 1 (no parked request): a group behind `o` outstanding is consumed at 1 + o // 2;
    # lag <= 1 allows o < 2, and the starvation floor allows the first 2.
    assert granted == 2
    h.submit("a0", [make_rollout("r1", "g1"), make_rollout("r2", "g2")])
    assert _grants(h.send("a0", GenerationRequest(seq=2, groups=10))) == 0  # parked
    out = h.request(size=2, version=0, max_lag=1)  # a batch leaves the buffer
    assert bodies(out, RolloutBatch) and _grants(out) == 2


def test_grants_follow_the_actors_version_and_the_rest_stays_parked():
    h = Harness(RunPolicy(group_size=1, rollouts_per_step=1, max_lag=2))
    h.learner()
    h.actor("a0")
    epoch = addressed(h.publish(3), WeightUpdate)["a0"].epoch
    # a0 still holds 0 and the next batch trains version 3 -> 4: even the first group would be stale
    # on arrival (lag 4 > max_lag 2), so nothing is granted until a0 loads the update
    assert _grants(h.send("a0", GenerationRequest(seq=1, groups=5))) == 0
    out = h.report("a0", 3, epoch)  # now at 3: groups consumed at 4 and 5 fit within max_lag 2
    assert _grants(out) == 2 and h.state.admission.parked["a0"].request.groups == 3


def test_a_dead_actors_grants_are_released():
    h = Harness(RunPolicy(group_size=1, rollouts_per_step=2, max_lag=0))
    h.learner()
    h.actor("a0")
    h.actor("a1")
    assert _grants(h.send("a0", GenerationRequest(seq=1, groups=5))) == 2
    assert _grants(h.send("a1", GenerationRequest(seq=1, groups=5)), "a1") == 0
    for _ in range(2):
        h.clock.advance(3)
        h.send("a1", Heartbeat(seq=1))
        h.send("L0", Heartbeat(seq=1))
    out = h.tick()  # a0 is dead: its two grants go to a1
    assert _grants(out, "a1") == 2


def test_stop_the_world_grants_one_step_per_version_to_current_actors_only():
    h = Harness(RunPolicy(mode="stop_the_world", group_size=2, rollouts_per_step=4, max_lag=0))
    h.learner()
    h.actor("a0")
    h.actor("a1")
    assert _grants(h.send("a0", GenerationRequest(seq=1, groups=5))) == 2
    assert _grants(h.send("a1", GenerationRequest(seq=1, groups=5)), "a1") == 0
    epoch = addressed(h.publish(1), WeightUpdate)["L0"].epoch
    out = h.report("a0", 1, epoch)  # only a0 holds version 1 so far
    assert _grants(out) == 2 and _grants(out, "a1") == 0
    h.report("a1", 1, epoch)
    out = h.report("L0", 1, epoch)
    assert _grants(out, "a1") == 0  # the step's quota went to a0


def test_stop_the_world_drops_rollouts_that_arrive_stale_and_their_groups_whole():
    h = Harness(RunPolicy(mode="stop_the_world", group_size=2, rollouts_per_step=2, max_lag=0))
    h.learner()
    h.actor("a0")
    h.submit("a0", [make_rollout("x-0", "x", 2)])
    epoch = addressed(h.publish(1), WeightUpdate)["a0"].epoch
    h.report("a0", 1, epoch)
    ack = bodies(h.submit("a0", [make_rollout("x-1", "x", 2)]), Ack)[0]  # its group began at version 0
    assert ack.acked == ["x-1"] and ack.dropped_stale == 1
    mixed = bodies(h.submit("a0", [make_rollout("m-0", "m", 2, version=[0, 1, 1, 1])]), Ack)[0]
    assert mixed.dropped_stale == 1
    status = h.state.status()
    assert status.dropped_stale_total == 3 and status.buffer_depth == 0 and balanced(h.state)


# ----------------------------------------------------------------------------- status and bad input


def test_status_request_needs_no_hello_and_reports_versions_lag_and_books():
    h = Harness()
    h.learner()
    h.actor("a0")
    h.publish(3)
    out = h.send("tool", StatusRequest(), msg_id="s")
    status = out[0].body
    assert isinstance(status, Status) and out[0].msg_id == "s" and status.latest_version == 3
    assert {p.peer_id: p.lag for p in status.peers} == {"a0": 3, "L0": 0}
    assert status.update_in_flight and status.epoch == 1


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x00\x01garbage", "malformed"),
        (msgspec.msgpack.encode({"kind": "hello", "schema": 999, "sender": "x", "msg_id": "m", "body": {}}), "schema_mismatch"),
        (msgspec.msgpack.encode({"kind": "nope", "schema": 2, "sender": "x", "msg_id": "m", "body": {}}), "unknown_kind"),
        (msgspec.msgpack.encode({"kind": "hello", "schema": 2, "sender": "x", "msg_id": "m", "body": {"peer_id": 3}}), "malformed"),
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


def test_broker_only_records_are_refused_from_peers():
    h = Harness()
    h.actor("a0")
    out = h.send("a0", Ack(acked=[]))
    assert out[0].body.code == "malformed" and "does not accept" in out[0].body.message


def test_an_empty_submission_gets_an_ack():
    h = Harness()
    h.actor("a0")
    out = h.submit("a0", [], msg_id="empty")
    assert [(o.msg_id, o.body) for o in out] == [("empty", Ack(acked=[]))]


def test_the_rate_window_stays_bounded_when_nobody_asks_for_status():
    h = Harness(RunPolicy(group_size=1, rollouts_per_step=64))
    h.actor("a0")
    for i in range(30):
        h.submit("a0", [make_rollout(f"r{i}", f"g{i}")])
        h.clock.advance(1.0)
    assert len(h.state._rate) <= 11  # the last 10 s of arrivals, not one entry per message ever
    assert h.state.rollouts_per_second() == 1.0
