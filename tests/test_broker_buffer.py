"""The rollout buffer's indexes agree with its contents, whatever the order of operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_broker_helpers import make_rollout

from tether.broker.buffer import RolloutBuffer


def brute_oldest(buffer: RolloutBuffer) -> int | None:
    versions = [r.min_version for r in buffer.rollouts() if r.min_version >= 0]
    return min(versions, default=None)


def test_oldest_version_ignores_empty_completions_and_follows_removals():
    buffer = RolloutBuffer(capacity=16)
    assert buffer.oldest_version() is None
    buffer.insert(make_rollout("empty", "e", 1, version=[], tokens=0), 0.0)
    assert buffer.oldest_version() is None  # no token: never stale
    buffer.insert(make_rollout("a", "g", 2, version=[3, 4]), 0.0)
    buffer.insert(make_rollout("b", "g", 2, version=5), 0.0)
    buffer.insert(make_rollout("c", "h", 1, version=2), 0.0)
    assert buffer.oldest_version() == 2
    buffer.remove("c")
    assert buffer.oldest_version() == 3
    buffer.insert(make_rollout("a", "g", 2, version=6), 0.0)  # the same id again replaces it
    assert buffer.oldest_version() == 5
    assert [r.rollout_id for r in buffer.take(1)] == ["empty"]
    assert buffer.oldest_version() == 5
    group = buffer.take(2)
    assert buffer.oldest_version() is None and buffer.depth == 0
    buffer.insert_group_first(group, 1.0)
    assert buffer.oldest_version() == 5


operations = st.lists(st.tuples(st.sampled_from(["insert", "remove", "remove_group", "take", "back"]),
                                st.integers(0, 5), st.integers(0, 3), st.integers(-1, 6)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_oldest_version_and_ready_count_always_equal_a_scan(ops):
    buffer = RolloutBuffer(capacity=8)
    taken = []
    for op, group_n, member, version in ops:
        gid = f"g{group_n}"
        if op == "insert":
            rollout = (make_rollout(f"{gid}-{member}", gid, 2, version=[], tokens=0) if version < 0
                       else make_rollout(f"{gid}-{member}", gid, 2, version=version))
            if buffer.admits(rollout):
                buffer.insert(rollout, 0.0)
        elif op == "remove":
            buffer.remove(f"{gid}-{member}")
        elif op == "remove_group":
            buffer.remove_group(gid)
        elif op == "take":
            taken += buffer.take(member + 1) or []
        elif op == "back" and taken:
            group_id = taken[0].group_id
            back = [r for r in taken if r.group_id == group_id]
            taken = [r for r in taken if r.group_id != group_id]
            if not buffer.has_group(group_id):
                buffer.insert_group_first(back, 1.0)
        assert buffer.oldest_version() == brute_oldest(buffer)
        assert buffer.ready == sum(len(buffer._groups[g]) for g in buffer._complete)
