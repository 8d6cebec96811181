"""The rollout ledger and its journal: what a broker restart (kill -9) keeps, and what it must not.

Every test here restarts a broker from the same journal file the way the daemon does
(`build_state`), so the replay path is the production one.
"""

from __future__ import annotations

import os
import struct
import threading

import msgspec
import pytest
from test_broker_helpers import FakeClock, Harness, addressed, balanced, bodies, group, make_rollout

from tether.broker import journal as journal_module
from tether.broker.journal import PUT, Journal
from tether.broker.ledger import Ledger
from tether.broker.server import build_state
from tether.broker.state import RunPolicy
from tether.common.config.broker import BrokerConfig
from tether.common.messages import SCHEMA_VERSION, Ack, Commit, RolloutBatch, WeightUpdate

POLICY = RunPolicy(group_size=1, rollouts_per_step=2, max_lag=4, max_tokens=16)


class Restartable(Harness):
    """A Harness whose broker can be killed and started again on the same journal."""

    def __init__(self, tmp_path, policy: RunPolicy = POLICY, **overrides) -> None:
        self.journal_path = tmp_path / "journal.bin"
        self.run_policy = policy
        self.overrides = {"journal_path": str(self.journal_path), "journal_fsync": "never", **overrides}
        super().__init__(policy, ledger=self._ledger(), **self.overrides)

    def _ledger(self) -> Ledger:
        cfg = BrokerConfig(**{"buffer_capacity": 64, **self.overrides})
        return Ledger(cfg.buffer_capacity, dedup_window=cfg.dedup_window, journal=Journal(self.journal_path, fsync="never"))

    def restart(self) -> None:
        """kill -9 (nothing is flushed beyond what write() handed the OS) and start again."""
        self.state.ledger.journal.close()
        self.state = build_state(self.cfg, self.run_policy, clock=self.clock)


def test_a_restart_keeps_buffered_leased_and_counted_rollouts(tmp_path):
    h = Restartable(tmp_path)
    h.learner()
    h.actor("a0")
    h.submit("a0", [make_rollout(f"r{i}", f"g{i}") for i in range(5)])
    bodies(h.request(seq=1, size=2, version=0), RolloutBatch)
    h.publish(1)
    bodies(h.request(seq=2, size=2, version=1), RolloutBatch)
    h.send("L0", Commit(version=1))
    before = h.state.status()
    h.restart()
    after = h.state.status()
    assert (after.stored_total, after.consumed_total, after.leased, after.buffer_depth) == \
           (before.stored_total, before.consumed_total, before.leased, before.buffer_depth) == (5, 2, 2, 1)
    assert after.latest_version == 1 and after.committed_version == 1 and after.lineage == "s1"
    assert balanced(h.state)
    # The same learner session asks again for the lease it may not have received: the same batch.
    h.learner()
    h.actor("a0", version=1, lineage="s1")
    again = bodies(h.request(seq=2, size=2, version=1), RolloutBatch)[0]
    assert [r.rollout_id for r in again.rollouts] == ["r2", "r3"]


def test_a_batch_leased_just_before_a_kill_is_served_again_not_lost(tmp_path):
    """A kill 0-3 ms after a BatchRequest used to lose the batch: it was marked consumed on serving."""
    h = Restartable(tmp_path)
    h.learner()
    h.actor("a0")
    h.submit("a0", group("g", 1) + group("h", 1))
    h.request(seq=1, size=2, version=0)  # the reply never reaches the learner
    h.restart()
    h.learner(session="s2", version=0, committed=-1)  # the learner died too and starts afresh
    batch = bodies(h.request(seq=1, size=2, version=0), RolloutBatch)[0]
    assert sorted(r.rollout_id for r in batch.rollouts) == ["g-0", "h-0"] and balanced(h.state)


def test_epochs_never_repeat_across_restarts(tmp_path):
    h = Restartable(tmp_path)
    h.learner()
    h.actor("a0")
    first = [o.body for o in h.publish(1) if isinstance(o.body, WeightUpdate)][0]
    h.restart()
    h.learner()
    h.actor("a0")
    second = [o.body for o in h.publish(2) if isinstance(o.body, WeightUpdate)][0]
    assert second.epoch > first.epoch and second.group_key != first.group_key


def test_de_duplication_covers_the_window_across_restarts_and_compactions(tmp_path):
    h = Restartable(tmp_path, dedup_window=50, buffer_capacity=8)
    h.learner()
    h.actor("a0")
    for step in range(10):  # 40 rollouts consumed, several compactions on the way
        h.submit("a0", [make_rollout(f"r{step}-{i}", f"g{step}-{i}", version=step) for i in range(4)])
        for seq in (2 * step + 1, 2 * step + 2):
            bodies(h.request(seq=seq, size=2, version=step), RolloutBatch)
        h.publish(step + 1)
        h.send("L0", Commit(version=step + 1))
    h.restart()
    h.learner()
    h.actor("a0", version=10, lineage="s1")
    ack = bodies(h.submit("a0", [make_rollout("r0-0", "g0-0")]), Ack)[0]
    assert ack.duplicates == 1 and h.state.ledger.depth == 0
    status = h.state.status()
    assert status.stored_total == 40 and status.consumed_total == 40 and balanced(h.state)


def test_a_torn_tail_is_cut_and_appends_continue(tmp_path):
    path = tmp_path / "j.bin"
    ledger = Ledger(16, dedup_window=100, journal=Journal(path, fsync="always"), clock=FakeClock())
    ledger.store([make_rollout("a", "ga"), make_rollout("b", "gb")])
    ledger.journal.close()
    path.write_bytes(path.read_bytes()[:-10])  # kill -9 in the middle of the second record
    again = Ledger(16, dedup_window=100, journal=Journal(path, fsync="never"), clock=FakeClock())
    again.replay()
    assert again.known("a") and not again.known("b") and again.stored_total == 1
    again.store([make_rollout("c", "gc")])
    again.journal.close()
    third = Ledger(16, dedup_window=100, journal=Journal(path, fsync="never"), clock=FakeClock())
    third.replay()
    assert third.depth == 2 and third.known("c") and third.balanced()


# ----------------------------------------------------------------------------- rollouts journaled as received


def put_payloads(path) -> list[bytes]:
    """The payload of every PUT record in a journal file, in order."""
    data, offset, payloads = path.read_bytes(), 0, []
    while offset < len(data):
        length, kind, _ = struct.unpack_from("<IBI", data, offset)
        offset += 9
        if kind == PUT:
            payloads.append(data[offset : offset + length])
        offset += length
    return payloads


def as_sent(rollout) -> bytes:
    """The rollout as an actor might encode it: fields in another order than tether's encoder."""
    fields = msgspec.to_builtins(rollout, builtin_types=(bytes,))
    return msgspec.msgpack.encode(dict(reversed(fields.items())))


def submit_as_sent(h: Harness, sender: str, encoded: list[bytes]) -> Ack:
    """A SubmitRollouts whose rollouts are exactly the bytes given."""
    body = b"\x81\xa8rollouts" + (b"\xdc" + struct.pack(">H", len(encoded))) + b"".join(encoded)
    envelope = msgspec.msgpack.encode({"kind": "submit_rollouts", "schema": SCHEMA_VERSION, "sender": sender,
                                       "msg_id": "m1", "body": msgspec.Raw(body)})
    return bodies(h.state.handle(sender.encode(), envelope), Ack)[0]


def test_rollouts_are_journaled_as_sent_and_replay_equal(tmp_path):
    h = Restartable(tmp_path)
    h.learner()
    h.actor("a0")
    rollouts = [make_rollout(f"r{i}", f"g{i}", version=[0, 0, 0, 0]) for i in range(3)]
    sent = [as_sent(r) for r in rollouts]
    assert sent[0] != msgspec.msgpack.encode(rollouts[0])  # the journal could not have re-encoded them
    assert submit_as_sent(h, "a0", sent).acked == ["r0", "r1", "r2"]
    assert put_payloads(h.journal_path) == sent
    h.restart()
    assert list(h.state.ledger.buffer.rollouts()) == rollouts and balanced(h.state)


def test_refused_and_duplicate_rollouts_are_not_journaled_and_the_rest_keep_their_own_bytes(tmp_path):
    h = Restartable(tmp_path)
    h.learner()
    h.actor("a0")
    foreign = make_rollout("bad", "gb", actor_id="a1")  # fails the run's rules: not the sender's
    first, second = make_rollout("r1", "g1"), make_rollout("r2", "g2")
    again = msgspec.structs.replace(first, reward=0.25)  # the same id again, other bytes
    sent = [as_sent(r) for r in (foreign, first, again, second)]
    ack = submit_as_sent(h, "a0", sent)
    assert [r.rollout_id for r in ack.invalid] == ["bad"] and ack.acked == ["r1", "r2", "r1"]
    assert ack.duplicates == 1
    assert put_payloads(h.journal_path) == [sent[1], sent[3]]
    h.restart()
    assert list(h.state.ledger.buffer.rollouts()) == [first, second] and balanced(h.state)


# ----------------------------------------------------------------------------- fsync policy "interval"


def test_interval_fsync_runs_in_the_background_one_at_a_time_and_close_waits_for_it(tmp_path, monkeypatch):
    release, calls = threading.Event(), []

    def slow_fsync(fd):  # a disk that takes its time
        calls.append(fd)
        assert release.wait(10)

    monkeypatch.setattr(journal_module.os, "fsync", slow_fsync)
    clock = FakeClock()
    journal = Journal(tmp_path / "j.bin", fsync="interval", fsync_interval_s=1.0, clock=clock)
    journal.put([make_rollout("a", "ga")])
    journal.maybe_sync()
    assert calls == []  # not due yet
    clock.advance(1.0)
    journal.maybe_sync()  # returns at once although the fsync has not finished
    journal.put([make_rollout("b", "gb")])  # acks go on: written, not yet synced
    clock.advance(5.0)
    journal.maybe_sync()
    assert len(calls) == 1  # still running: no second fsync at the same time
    release.set()
    journal.close()  # waits for the running fsync, then syncs what was written after it started
    assert len(calls) == 2
    assert [r.rollout_id for kind, r in Journal(tmp_path / "j.bin").replay()] == ["a", "b"]

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module.os, "fsync", failing_fsync)
    journal = Journal(tmp_path / "k.bin", fsync="interval", fsync_interval_s=1.0, clock=clock)
    journal.put([make_rollout("c", "gc")])
    clock.advance(1.0)
    journal.maybe_sync()
    journal._syncer.join()
    with pytest.raises(OSError, match="Input/output"):
        journal.maybe_sync()  # the loop learns of it, as when the fsync ran inline
    monkeypatch.setattr(journal_module.os, "fsync", os.fsync)
    journal.close()


# ----------------------------------------------------------------------------- one write per message


@pytest.mark.parametrize("count", [1, 3, journal_module._IOV_MAX // 2 + 1])  # the last: more parts than IOV_MAX
def test_a_message_is_journaled_in_writev_calls_and_short_writes_are_finished(tmp_path, monkeypatch, count):
    real_writev, calls = os.writev, []

    def short_writev(fd, buffers):  # the kernel may write less than asked
        calls.append(len(buffers))
        return real_writev(fd, list(buffers)[: max(1, len(buffers) // 3)])

    monkeypatch.setattr(journal_module.os, "writev", short_writev)
    rollouts = [make_rollout(f"r{i}", f"g{i}", tokens=i % 5) for i in range(count)]
    journal = Journal(tmp_path / "j.bin", fsync="never")
    journal.put(rollouts, [msgspec.Raw(msgspec.msgpack.encode(r)) if i % 2 else None for i, r in enumerate(rollouts)])
    journal.put([make_rollout("last", "gl")])
    journal.close()
    assert all(n <= journal_module._IOV_MAX for n in calls) and len(calls) == -(-2 * count // journal_module._IOV_MAX) + 1
    assert [r for _, r in Journal(tmp_path / "j.bin").replay()] == [*rollouts, make_rollout("last", "gl")]


def test_a_message_mixing_invalid_stale_fresh_and_repeated_rollouts_journals_the_fresh_ones_as_sent(tmp_path):
    """stop_the_world: of one message, the invalid rollout is named, the stale one acked as dropped,
    and exactly the fresh ones journaled, each with its own bytes (a repeated id is a duplicate)."""
    policy = RunPolicy(mode="stop_the_world", group_size=1, rollouts_per_step=2, max_lag=0, max_tokens=16)
    h = Restartable(tmp_path, policy=policy)
    h.learner()
    h.actor("a0")
    epoch = addressed(h.publish(1), WeightUpdate)["a0"].epoch
    h.report("a0", 1, epoch)
    fresh = [make_rollout(f"f{i}", f"gf{i}", version=1) for i in range(3)]
    stale = make_rollout("old", "go", version=0)
    foreign = make_rollout("bad", "gb", actor_id="a1", version=1)
    again = msgspec.structs.replace(fresh[0], reward=0.5)
    sent = [as_sent(r) for r in (fresh[0], stale, foreign, fresh[1], again, fresh[2])]
    ack = submit_as_sent(h, "a0", sent)
    assert [r.rollout_id for r in ack.invalid] == ["bad"]
    assert sorted(ack.acked) == ["f0", "f0", "f1", "f2", "old"] and ack.duplicates == 1 and ack.dropped_stale == 1
    assert put_payloads(h.journal_path) == [sent[0], sent[3], sent[5]]
    h.restart()
    assert list(h.state.ledger.buffer.rollouts()) == fresh and balanced(h.state)


# ----------------------------------------------------------------------------- compaction in the background


def _gated_rewrites(monkeypatch) -> threading.Event:
    """Background compactions wait for the returned event before writing anything."""
    gate = threading.Event()

    class Gated(journal_module._Rewrite):
        def _run(self) -> None:
            gate.wait(30)
            super()._run()

    monkeypatch.setattr(journal_module, "_Rewrite", Gated)
    return gate


def _ledger_on(path) -> Ledger:
    return Ledger(64, dedup_window=100, journal=Journal(path, fsync="never"), clock=FakeClock(), compact_every=None)


def _ledger_with_consumed(path, stored: int, consumed: int) -> Ledger:
    """A ledger that stored a0.. a<stored-1> and consumed the first `consumed` (leased at step 0, committed)."""
    ledger = _ledger_on(path)
    ledger.store([make_rollout(f"a{i}", f"ga{i}") for i in range(stored)])
    ledger.lease("s1", 0, 1, 0, consumed)
    ledger.commit("s1", 1)
    return ledger


def _books(ledger: Ledger) -> tuple:
    return (ledger.depth, ledger.leased, ledger.counters(), sorted(ledger.leases),
            sorted(r.rollout_id for r in ledger.buffer.rollouts()))


@pytest.mark.parametrize("tail_for_loop", [journal_module._TAIL_FOR_LOOP, 0])
def test_a_background_compaction_keeps_what_was_appended_while_it_ran(tmp_path, monkeypatch, tail_for_loop):
    """The ledger moves on (stores, leases, commits) while the compaction runs; once swapped in, the
    file is compacted and replays to the same books. With tail_for_loop 0 the compaction's thread
    copies the appended records itself; by default the loop copies them when it swaps."""
    monkeypatch.setattr(journal_module, "_TAIL_FOR_LOOP", tail_for_loop)
    gate = _gated_rewrites(monkeypatch)
    path = tmp_path / "j.bin"
    ledger = _ledger_with_consumed(path, 12, 8)  # the PUT records of the 8 consumed are what compaction drops
    ledger.compact(background=True)
    assert ledger.journal.rewriting and not ledger.journal.poll_rewrite()  # still waiting at the gate
    ledger.store([make_rollout(f"b{i}", f"gb{i}") for i in range(6)])
    ledger.lease("s1", 0, 2, 1, 4)  # leases snapshot rollouts (a0-a3 buffered then) and new ones
    ledger.commit("s1", 1)  # nothing of step 1 yet: the lease stays
    ledger.drop_groups(["gb5"], "test")
    gate.set()
    assert ledger.journal.poll_rewrite(wait=True) and not ledger.journal.rewriting
    assert not (tmp_path / "j.bin.tmp").exists()
    ledger.store([make_rollout("c0", "gc0")])  # appends go on to the new file
    books = _books(ledger)
    ledger.journal.close()
    assert not (tmp_path / "j.bin.old").exists()  # the replaced file, unlinked by a thread
    rollouts = [value.rollout_id for kind, value in Journal(path).replay() if kind in (PUT, journal_module.RESTORE)]
    assert sorted(rollouts) == sorted(f"a{i}" for i in range(8, 12)) + [f"b{i}" for i in range(6)] + ["c0"]
    again = _ledger_on(path)
    again.replay()
    assert _books(again) == books and again.known("a0") and again.known("b5") and again.balanced()


def test_a_broker_killed_mid_compaction_replays_the_whole_journal(tmp_path, monkeypatch):
    gate = _gated_rewrites(monkeypatch)
    path = tmp_path / "j.bin"
    ledger = _ledger_with_consumed(path, 6, 4)
    ledger.compact(background=True)
    ledger.store([make_rollout("b0", "gb0")])
    books = _books(ledger)
    closer = threading.Thread(target=ledger.journal.close)  # as the restart helper's kill does
    closer.start()
    gate.set()
    closer.join(30)
    assert not closer.is_alive() and not (tmp_path / "j.bin.tmp").exists()
    again = _ledger_on(path)
    again.replay()
    assert _books(again) == books and again.known("a0") and again.balanced()


def test_a_failed_background_compaction_is_raised_in_the_loop_and_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "j.bin"
    ledger = _ledger_on(path)
    ledger.store([make_rollout(f"a{i}", f"ga{i}") for i in range(3)])

    def failing():
        yield journal_module.frame(journal_module.SEEN, journal_module.Ids(ids=["x"]))
        raise OSError("No space left on device")

    assert ledger.journal.rewrite_in_background(failing())
    with pytest.raises(OSError, match="No space left"):
        ledger.journal.poll_rewrite(wait=True)
    assert not (tmp_path / "j.bin.tmp").exists() and not ledger.journal.rewriting
    ledger.store([make_rollout("b0", "gb0")])
    books = _books(ledger)
    ledger.journal.close()
    again = _ledger_on(path)
    again.replay()
    assert _books(again) == books


def test_compaction_runs_in_the_background_during_a_run_and_at_start_in_place(tmp_path, monkeypatch):
    """Due compactions start in the background as rollouts finish; the one after a replay, before
    the broker serves, runs in place."""
    gate = _gated_rewrites(monkeypatch)
    h = Restartable(tmp_path, buffer_capacity=4, dedup_window=4)  # compacts every 16 finished
    h.learner()
    h.actor("a0")
    for step in range(5):
        h.submit("a0", [make_rollout(f"r{step}-{i}", f"g{step}-{i}", version=step) for i in range(4)])
        bodies(h.request(seq=step + 1, size=4, version=step), RolloutBatch)
        h.publish(step + 1)
        h.send("L0", Commit(version=step + 1))
    journal = h.state.ledger.journal
    assert journal.rewriting  # 20 finished: one compaction started, held at the gate
    gate.set()
    journal.poll_rewrite(wait=True)
    assert journal.finished_since_compaction == 4  # those of step 4 came after its snapshot
    h.restart()  # replays, then compacts in place (the gate is open, and it is not used)
    assert not h.state.ledger.journal.rewriting and h.state.ledger.journal.finished_since_compaction == 0
    status = h.state.status()
    assert (status.stored_total, status.consumed_total, status.buffer_depth) == (20, 20, 0) and balanced(h.state)


def test_files_left_by_a_broker_killed_mid_compaction_are_removed_at_start(tmp_path):
    path = tmp_path / "j.bin"
    ledger = _ledger_on(path)
    ledger.store([make_rollout("a0", "ga0")])
    ledger.journal.close()
    (tmp_path / "j.bin.tmp").write_bytes(b"half a snapshot")
    os.link(path, tmp_path / "j.bin.old")  # killed between the rename and the old file's removal
    again = _ledger_on(path)
    assert not (tmp_path / "j.bin.tmp").exists() and not (tmp_path / "j.bin.old").exists()
    again.replay()
    assert again.known("a0") and again.depth == 1


def test_a_compaction_swaps_in_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(journal_module.os, "link", no_links)
    path = tmp_path / "j.bin"
    ledger = _ledger_with_consumed(path, 4, 2)
    ledger.compact(background=True)
    assert ledger.journal.poll_rewrite(wait=True)
    books = _books(ledger)
    ledger.journal.close()
    assert not (tmp_path / "j.bin.old").exists()
    again = _ledger_on(path)
    again.replay()
    assert _books(again) == books and again.known("a0")
