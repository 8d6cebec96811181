"""Admission's shortcut (nothing can be granted, so nobody is asked) grants exactly what the full
pass over every parked actor grants, and leaves the same turn order behind."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.broker.admission import Admission, AdmissionPolicy
from tether.common.messages import GenerationRequest

actors = st.dictionaries(st.sampled_from([f"a{i}" for i in range(6)]),
                         st.tuples(st.integers(1, 5), st.one_of(st.none(), st.integers(0, 8))), max_size=6)


@settings(max_examples=300, deadline=None)
@given(mode=st.sampled_from(["inflight", "stop_the_world"]), group_size=st.sampled_from([1, 2, 4]),
       steps=st.integers(1, 3), max_lag=st.integers(0, 3), capacity=st.integers(1, 40), parked=actors,
       granted=st.dictionaries(st.sampled_from([f"a{i}" for i in range(6)]), st.integers(0, 4), max_size=6),
       calls=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=6),
       turn=st.integers(0, 10))
def test_the_shortcut_changes_nothing(mode, group_size, steps, max_lag, capacity, parked, granted, calls, turn):
    policy = AdmissionPolicy(mode, steps * group_size, group_size, max_lag, capacity)
    full = Admission(policy)
    for actor_id, (groups, _) in parked.items():
        full.request(actor_id, actor_id.encode(), f"m-{actor_id}", GenerationRequest(seq=1, groups=groups))
    full.granted = dict(granted)
    full._turn = turn
    fast = copy.deepcopy(full)
    versions = {actor_id: version for actor_id, (_, version) in parked.items()}
    bound = max((v for v in versions.values() if v is not None), default=-1)
    for buffered, next_step, latest in calls:
        expected = full.serve(buffered=buffered, next_step=next_step, latest_version=latest,
                              actor_version=versions.get)
        got = fast.serve(buffered=buffered, next_step=next_step, latest_version=latest,
                         actor_version=versions.get, max_version=bound)
        assert got == expected
        assert (fast._turn, fast._version_grants, fast.granted) == (full._turn, full._version_grants, full.granted)
        assert fast.parked == full.parked
