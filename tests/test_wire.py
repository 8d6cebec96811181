"""Wire protocol: every record round-trips, and no byte string crashes the decoder."""

from __future__ import annotations

import re
import threading

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.common import messages as m
from tether.common import wire
from tether.common.errors import WireDecodeError

ids = st.text(min_size=1, max_size=24)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
small_int = st.integers(min_value=0, max_value=2**31 - 1)


@st.composite
def rollouts(draw):
    n = draw(st.integers(min_value=0, max_value=40))
    versions = np.sort(np.array(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n)), dtype=np.int32))
    return m.Rollout(
        rollout_id=draw(ids),
        group_id=draw(ids),
        group_size=draw(st.integers(1, 64)),
        actor_id=draw(ids),
        task=draw(ids),
        prompt_token_ids=m.int32_array(draw(st.lists(st.integers(0, 2**31 - 1), max_size=30))),
        completion_token_ids=m.int32_array(draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))),
        logprobs=m.float32_array(draw(st.lists(st.floats(-50, 0, width=32), min_size=n, max_size=n))),
        versions=m.Array.from_numpy(versions),
        reward=draw(finite),
        sampling=draw(sampling_specs()),
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
        created_at=draw(st.floats(0, 2e9)),
    )


@st.composite
def sampling_specs(draw):
    return m.SamplingSpec(
        temperature=draw(st.floats(0.01, 5)),
        max_tokens=draw(st.integers(1, 4096)),
        top_k=draw(st.integers(0, 1000)),
        top_p=draw(st.floats(0.01, 1.0)),
        seed=draw(st.none() | st.integers(0, 2**31)),
    )


tensor_specs = st.builds(
    m.TensorSpec,
    name=ids,
    shape=st.lists(st.integers(0, 4096), max_size=3).map(tuple),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)

versions_ = st.integers(0, 10**6)
seqs = st.integers(0, 2**40)
id_lists = st.lists(ids, max_size=5)

RECORD_STRATEGIES = {
    m.Hello: st.builds(m.Hello, peer_id=ids, role=st.sampled_from(["actor", "learner", "tool"]), incarnation=ids,
                       rank=st.integers(0, 64), session=st.text(max_size=20), worker_count=st.integers(0, 64),
                       host=st.text(max_size=20), pid=small_int, loaded_version=versions_,
                       loaded_lineage=st.text(max_size=20), committed_version=st.integers(-1, 10**6)),
    m.Welcome: st.builds(m.Welcome, broker_incarnation=ids, latest_version=versions_, lineage=st.text(max_size=20),
                         ready=st.booleans()),
    m.Heartbeat: st.builds(m.Heartbeat, seq=seqs),
    m.StatusRequest: st.just(m.StatusRequest()),
    m.Status: st.builds(
        m.Status,
        broker_incarnation=ids,
        peers=st.lists(st.builds(m.PeerStatus, peer_id=ids, role=st.sampled_from(["actor", "learner"]),
                                 alive=st.booleans(), loaded_version=st.integers(-1, 100), lag=st.integers(0, 100),
                                 ready=st.booleans(), seconds_since_seen=st.floats(0, 1e6)), max_size=3),
        latest_version=versions_, lineage=st.text(max_size=20), epoch=small_int, committed_version=st.integers(-1, 99),
        buffer_depth=small_int, leased=small_int, rollouts_per_second=st.floats(0, 1e6), stored_total=small_int,
        consumed_total=small_int, dropped_stale_total=small_int, granted_groups=small_int,
        update_in_flight=st.booleans()),
    m.Error: st.builds(m.Error, code=st.sampled_from(["malformed", "unknown_kind", "too_large", "forbidden", "internal"]),
                       message=st.text(max_size=50), ref_msg_id=st.text(max_size=32)),
    m.SubmitRollouts: st.builds(m.SubmitRollouts, rollouts=st.lists(rollouts(), max_size=3)),
    m.Ack: st.builds(m.Ack, acked=id_lists, duplicates=small_int, dropped_stale=small_int, retry=id_lists,
                     retry_reason=st.text(max_size=20),
                     invalid=st.lists(st.builds(m.RolloutRejection, rollout_id=ids, reason=st.text(max_size=20)),
                                      max_size=2)),
    m.GenerationRequest: st.builds(m.GenerationRequest, seq=seqs, groups=st.integers(1, 1000)),
    m.GenerationGrant: st.builds(m.GenerationGrant, seq=seqs, groups=st.integers(1, 1000), version=versions_),
    m.BatchRequest: st.builds(m.BatchRequest, rank=st.integers(0, 64), seq=seqs, size=st.integers(1, 4096),
                              learner_version=versions_, max_lag=small_int),
    m.RolloutBatch: st.builds(m.RolloutBatch, seq=seqs, learner_version=versions_,
                              rollouts=st.lists(rollouts(), max_size=3), dropped_stale=small_int),
    m.PublishRequest: st.builds(m.PublishRequest, version=versions_, tensors=st.lists(tensor_specs, min_size=1, max_size=4),
                                bucket_bytes=st.integers(1, 2**31)),
    m.PublishDeferred: st.builds(m.PublishDeferred, version=versions_, reason=st.text(max_size=30)),
    m.PublishWanted: st.builds(m.PublishWanted, latest_version=versions_, reason=st.text(max_size=30)),
    m.WeightUpdate: st.builds(m.WeightUpdate, version=versions_, lineage=st.text(max_size=20), epoch=small_int,
                              group_key=st.text(max_size=60), group_host=st.text(max_size=20),
                              group_port=st.integers(0, 65535), world_size=st.integers(1, 128),
                              first_rank=st.integers(0, 128), tensors=st.lists(tensor_specs, max_size=4),
                              bucket_bytes=st.integers(1, 2**31), discard_above=st.integers(-1, 10**6)),
    m.UpdateReport: st.builds(m.UpdateReport, version=versions_, epoch=small_int, ok=st.booleans(),
                              seconds=st.floats(0, 100), error=st.text(max_size=30)),
    m.Commit: st.builds(m.Commit, version=versions_),
    m.CommitAck: st.builds(m.CommitAck, version=versions_, consumed=small_int),
}


def test_every_wire_record_has_a_strategy():
    assert set(RECORD_STRATEGIES) == set(m.BODY_TYPES.values())


@pytest.mark.parametrize("record_type", list(RECORD_STRATEGIES), ids=lambda t: t.KIND)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(record_type, data):
    record = data.draw(RECORD_STRATEGIES[record_type])
    message = wire.decode(wire.encode(record, sender="peer-1", msg_id="m1"))
    assert message.body == record
    assert (message.kind, message.sender, message.msg_id) == (record_type.KIND, "peer-1", "m1")


def _rollout(**changes):
    base = dict(
        rollout_id="r", group_id="g", group_size=2, actor_id="a", task="arithmetic",
        prompt_token_ids=m.int32_array([1, 2, 3]), completion_token_ids=m.int32_array([4, 5]),
        logprobs=m.float32_array([-0.5, -1.0]), versions=m.int32_array([3, 4]), reward=1.0,
        sampling=m.SamplingSpec(temperature=0.7, max_tokens=8, top_p=0.9), finish_reason="stop",
    )
    return base | changes


def _raw_message(rollout_body: dict, **envelope) -> bytes:
    """A SubmitRollouts message carrying one rollout given as a raw map."""
    fields = dict(kind="submit_rollouts", schema=m.SCHEMA_VERSION, sender="s", msg_id="1",
                  body={"rollouts": [rollout_body]}) | envelope
    return msgspec.msgpack.encode(fields)


def _body(record) -> dict:
    return msgspec.to_builtins(record, builtin_types=(bytes,))


def test_arrays_are_raw_little_endian_bytes():
    rollout = m.Rollout(**_rollout())
    body = msgspec.msgpack.decode(wire.encode(m.SubmitRollouts(rollouts=[rollout]), sender="s"))["body"]["rollouts"][0]
    assert body["logprobs"] == {"dtype": "<f4", "shape": [2], "data": np.array([-0.5, -1.0], "<f4").tobytes()}
    assert rollout.versions.numpy().tolist() == [3, 4]


@pytest.mark.parametrize(
    ("change", "field_in_message"),
    [
        ({"versions": {"dtype": "<i4", "shape": [2], "data": np.array([5, 4], "<i4").tobytes()}}, "versions"),
        ({"logprobs": {"dtype": "<f4", "shape": [1], "data": np.array([-1], "<f4").tobytes()}}, "logprobs"),
        ({"logprobs": {"dtype": "<f4", "shape": [2], "data": np.array([-1, 0.5], "<f4").tobytes()}}, "logprobs"),
        ({"logprobs": {"dtype": "<f8", "shape": [2], "data": np.array([-1, -1], "<f8").tobytes()}}, "logprobs"),
        ({"completion_token_ids": {"dtype": "<i4", "shape": [3], "data": b"\0" * 8}}, "array data"),
        ({"reward": "high"}, "$.body.rollouts[0].reward"),
        ({"prompt_token_ids": {"dtype": "<i4", "shape": [1], "data": np.array([-3], "<i4").tobytes()}}, "negative token id"),
        ({"group_size": 2**40}, "group_size"),
        ({"reward": float("nan")}, "reward"),
        ({"sampling": {"temperature": 0.0, "max_tokens": 3}}, "temperature"),
        ({"finish_reason": "exploded"}, "$.body.rollouts[0].finish_reason"),
        ({"group_size": 0}, "group_size"),
        ({"rollout_id": ""}, "rollout_id"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_invalid_rollout_fields_are_named(change, field_in_message):
    body = _body(m.Rollout(**_rollout())) | change
    with pytest.raises(WireDecodeError, match=re.escape(field_in_message)):
        wire.decode(_raw_message(body))


EDGE_LOGPROBS = [0.0, -0.0, 1e-4, float(np.nextafter(np.float32(1e-4), np.float32(1))), 5e-5, 0.5, -1e30,
                 float("inf"), float("-inf"), float("nan"), -float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)]


@pytest.mark.parametrize("logprobs", [[a, b] for a in EDGE_LOGPROBS for b in (-1.0, *EDGE_LOGPROBS)] + [[x] for x in EDGE_LOGPROBS])
def test_the_logprob_rule_accepts_exactly_finite_values_up_to_1e_4(logprobs):
    """The decoder's fast check (min and max) against the rule as written: all finite, none > 1e-4."""
    array = np.asarray(logprobs, dtype=np.float32)
    allowed = bool(np.all(np.isfinite(array)) and not np.any(array > np.float32(1e-4)))
    change = {"logprobs": m.float32_array(array), "completion_token_ids": m.int32_array(np.arange(len(array))),
              "versions": m.int32_array(np.zeros(len(array)))}
    if allowed:
        m.Rollout(**_rollout(**change))
    else:
        with pytest.raises(ValueError, match="logprobs"):
            m.Rollout(**_rollout(**change))


@pytest.mark.parametrize("versions", [[0], [3, 3, 4], [4, 3], [-1], [0, -1], [-3, -3, -3], [5, -2**31], [0, 2**31 - 1, -1],
                                      [2**31 - 1, 2**31 - 1], [1, 2, 1, 2]])
def test_versions_must_be_non_negative_and_never_decrease(versions):
    allowed = versions[0] >= 0 and all(b >= a for a, b in zip(versions, versions[1:], strict=False))
    change = {"versions": m.int32_array(versions), "logprobs": m.float32_array([-1.0] * len(versions)),
              "completion_token_ids": m.int32_array(range(len(versions)))}
    if allowed:
        rollout = m.Rollout(**_rollout(**change))
        assert (rollout.min_version, rollout.max_version) == (versions[0], versions[-1])
    else:  # [5, -2**31] once passed: np.diff wrapped around in int32
        with pytest.raises(ValueError, match="versions"):
            m.Rollout(**_rollout(**change))


def test_an_empty_completion_has_no_version():
    empty = m.Rollout(**_rollout(completion_token_ids=m.int32_array([]), logprobs=m.float32_array([]),
                                 versions=m.int32_array([])))
    assert (empty.min_version, empty.max_version, empty.num_completion_tokens) == (-1, -1, 0)


def test_submitted_rollouts_keep_the_bytes_they_were_sent_as():
    rollouts = [m.Rollout(**_rollout(rollout_id=f"r{i}")) for i in range(3)]
    message = wire.decode(wire.encode(m.SubmitRollouts(rollouts=rollouts), sender="s"))
    assert message.body.rollouts == rollouts
    assert [bytes(raw) for raw in message.raw_rollouts] == [msgspec.msgpack.encode(r) for r in rollouts]
    assert wire.decode(wire.encode(m.Commit(version=1), sender="s")).raw_rollouts is None


def test_a_bad_rollout_among_good_ones_fails_the_message_as_a_whole_body_decode_does():
    good = _body(m.Rollout(**_rollout()))
    bad = good | {"versions": {"dtype": "<i4", "shape": [2], "data": np.array([5, 4], "<i4").tobytes()}}
    data = msgspec.msgpack.encode(dict(kind="submit_rollouts", schema=m.SCHEMA_VERSION, sender="s", msg_id="1",
                                       body={"rollouts": [good, good, bad]}))
    with pytest.raises(WireDecodeError) as raised:
        wire.decode(data)
    assert "$.body.rollouts[2]" in str(raised.value) and "never decrease" in str(raised.value)


@pytest.mark.parametrize(("shape", "nbytes", "error"), [
    ((), 4, None), ((0,), 0, None), ((2, 3), 24, None), ((3, -1), 0, "negative dimension"),
    ((-2, -3), 24, "negative dimension"), ((2, 2, 2, 2, 2), 128, "dimensions"), ((2, 3), 20, "needs 24"),
    ((1 << 20, 1 << 20), 0, "exceeds"),
])
def test_array_shapes_are_checked_against_the_data(shape, nbytes, error):
    if error is None:
        assert m.Array(dtype="<f4", shape=shape, data=b"\0" * nbytes).numpy().shape == shape
    else:
        with pytest.raises(ValueError, match=error):
            m.Array(dtype="<f4", shape=shape, data=b"\0" * nbytes)


def test_rollout_records_are_not_tracked_by_the_garbage_collector():
    """They cannot form cycles (immutable, hold no containers of their own kind): see messages.py."""
    import gc

    rollout = wire.decode(wire.encode(m.SubmitRollouts(rollouts=[m.Rollout(**_rollout())]), sender="s")).body.rollouts[0]
    assert not any(gc.is_tracked(x) for x in (rollout, rollout.sampling, rollout.logprobs, rollout.versions))


def test_envelope_errors_are_specific():
    body = _body(m.Rollout(**_rollout()))
    with pytest.raises(WireDecodeError, match="schema version 99"):
        wire.decode(_raw_message(body, schema=99))
    with pytest.raises(WireDecodeError, match="unknown message kind 'teleport'"):
        wire.decode(_raw_message(body, kind="teleport"))
    with pytest.raises(WireDecodeError, match="exceeds the limit"):
        wire.decode(_raw_message(body), max_bytes=10)
    with pytest.raises(WireDecodeError, match="malformed envelope"):
        wire.decode(b"\x93\x01\x02")


def test_oversized_array_declaration_is_refused_without_allocating():
    huge = {"dtype": "<f4", "shape": [2**31, 2**31], "data": b""}
    with pytest.raises(WireDecodeError, match="exceeds"):
        wire.decode(_raw_message(_body(m.Rollout(**_rollout())) | {"logprobs": huge}))


def test_encode_refuses_non_records():
    with pytest.raises(TypeError):
        wire.encode(m.SamplingSpec(temperature=1.0, max_tokens=1), sender="s")
    with pytest.raises(TypeError):  # a rollout travels inside SubmitRollouts or RolloutBatch only
        wire.encode(m.Rollout(**_rollout()), sender="s")


def test_a_publish_request_without_tensors_is_refused():
    raw = msgspec.msgpack.encode(dict(kind="publish_request", schema=m.SCHEMA_VERSION, sender="s", msg_id="1",
                                      body={"version": 1, "tensors": [], "bucket_bytes": 8}))
    with pytest.raises(WireDecodeError, match="tensors must not be empty"):
        wire.decode(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_decode_error(data):
    try:
        wire.decode(data)
    except WireDecodeError:
        pass


VALID_MESSAGES = [
    wire.encode(m.SubmitRollouts(rollouts=[m.Rollout(**_rollout())]), sender="actor-0"),
    wire.encode(m.PublishRequest(version=3, tensors=[m.TensorSpec(name="w", shape=(2, 3), dtype="float32")],
                                 bucket_bytes=1024), sender="learner-0"),
    wire.encode(m.Hello(peer_id="actor-0", role="actor", incarnation="i", worker_count=1), sender="actor-0"),
]


@settings(max_examples=1500, deadline=None)
@given(
    which=st.integers(0, len(VALID_MESSAGES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "insert", "delete"])),
                   min_size=1, max_size=6),
)
def test_fuzz_mutated_messages_raise_only_decode_error(which, edits):
    data = bytearray(VALID_MESSAGES[which])
    for position, value, op in edits:
        i = position % (len(data) + 1)
        if op == "set" and i < len(data):
            data[i] = value
        elif op == "insert":
            data.insert(i, value)
        elif op == "delete" and i < len(data):
            del data[i]
    try:
        message = wire.decode(bytes(data))
    except WireDecodeError:
        return
    # A mutation that still decodes must still satisfy every record invariant.
    assert type(message.body).KIND == message.kind


def test_truncations_of_valid_messages_raise_only_decode_error():
    for data in VALID_MESSAGES:
        for cut in range(len(data)):
            with pytest.raises(WireDecodeError):
                wire.decode(data[:cut])


def test_every_record_field_is_documented_and_the_protocol_document_is_current():
    from pathlib import Path

    from tether.common.docstrings import field_docs
    from tether.common.wire_reference import NESTED, refresh

    for cls in [*m.BODY_TYPES.values(), *NESTED]:
        undocumented = [f.name for f in msgspec.structs.fields(cls) if f.name not in field_docs(cls)]
        assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"
    document = Path(__file__).resolve().parents[1] / "docs" / "wire-protocol.md"
    assert document.read_text() == refresh(document.read_text()), \
        "docs/wire-protocol.md is stale: python -m tether.common.wire_reference --write docs/wire-protocol.md"


# ----------------------------------------------------------------------------- checks per message

def _submit_data(bodies: list[dict]) -> bytes:
    return msgspec.msgpack.encode(dict(kind="submit_rollouts", schema=m.SCHEMA_VERSION, sender="s", msg_id="1",
                                       body={"rollouts": bodies}))


def _reference_outcome(bodies: list[dict]) -> str:
    """What decoding the message rollout by rollout, every check in each Rollout, gives: "ok" or
    the error text a whole-body decode reports."""
    try:
        msgspec.msgpack.Decoder(m.SubmitRollouts).decode(msgspec.msgpack.encode({"rollouts": bodies}))
    except (msgspec.ValidationError, ValueError) as exc:
        return f"submit_rollouts body: {wire._with_root(str(exc))}"
    return "ok"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.lists(st.integers(-3, 2**31 - 1), max_size=4),                       # prompt ids
    st.lists(st.tuples(st.integers(-2, 2**31 - 1),                         # completion id
                       st.sampled_from([-1.0, 0.0, -0.0, 1e-4, 5e-5, 0.5, float("nan"), float("inf"),
                                        float("-inf"), -1e30]),                # logprob
                       st.integers(-1, 3)), max_size=4),                     # version
), min_size=1, max_size=5))
def test_checking_the_contents_per_message_accepts_and_refuses_exactly_what_per_rollout_checks_do(specs):
    """wire.decode checks the arrays of a SubmitRollouts once for all its rollouts: same verdict, and on a
    refusal the same error (naming the first bad rollout), as the checks in each Rollout."""
    bodies = []
    for i, (prompt, completion) in enumerate(specs):
        body = _body(m.Rollout(**_rollout(rollout_id=f"r{i}")))
        body["prompt_token_ids"] = _body(m.int32_array(prompt))
        body["completion_token_ids"] = _body(m.int32_array([c[0] for c in completion]))
        body["logprobs"] = _body(m.float32_array([c[1] for c in completion]))
        body["versions"] = _body(m.int32_array(sorted(c[2] for c in completion)) if i % 2 else
                                 m.int32_array([c[2] for c in completion]))
        bodies.append(body)
    expected = _reference_outcome(bodies)
    if expected == "ok":
        message = wire.decode(_submit_data(bodies))
        assert [bytes(msgspec.msgpack.encode(r)) for r in message.body.rollouts] == \
            [msgspec.msgpack.encode(b) for b in bodies]
        assert message.max_token_id == max((i for p, c in specs for i in [*p, *(t[0] for t in c)]), default=-1)
    else:
        with pytest.raises(WireDecodeError) as raised:
            wire.decode(_submit_data(bodies))
        assert str(raised.value) == expected
    assert not m._batch.deferred


@pytest.mark.parametrize("change", [
    {"prompt_token_ids": {"dtype": "<i4", "shape": [1], "data": np.array([-3], "<i4").tobytes()}},
    {"completion_token_ids": {"dtype": "<i4", "shape": [2], "data": np.array([1, -2**31], "<i4").tobytes()}},
    {"logprobs": {"dtype": "<f4", "shape": [2], "data": np.array([-1, np.nan], "<f4").tobytes()}},
    {"versions": {"dtype": "<i4", "shape": [2], "data": np.array([-1, -1], "<i4").tobytes()}},
    {"group_size": 0},
])
@pytest.mark.parametrize("position", [0, 1, 3])
def test_a_rollout_breaking_a_content_rule_is_named_wherever_it_is_in_the_message(change, position):
    good = _body(m.Rollout(**_rollout()))
    bodies = [good] * 4
    bodies[position] = good | change
    with pytest.raises(WireDecodeError) as raised:
        wire.decode(_submit_data(bodies))
    assert f"$.body.rollouts[{position}]" in str(raised.value)
    assert str(raised.value) == _reference_outcome(bodies)


def test_rollouts_built_outside_a_message_decode_are_checked_on_their_own():
    """The per-message deferral is for the decoder only (and per thread): direct construction and
    other decoders still check every rollout, also after a message failed to decode."""
    bad_ids = m.int32_array([-1])
    with pytest.raises(WireDecodeError):
        wire.decode(_submit_data([_body(m.Rollout(**_rollout())) | {"prompt_token_ids": _body(bad_ids)}]))
    with pytest.raises(ValueError, match="negative token id"):
        m.Rollout(**_rollout(prompt_token_ids=bad_ids))
    with pytest.raises(msgspec.ValidationError, match="negative token id"):
        msgspec.msgpack.Decoder(m.Rollout).decode(msgspec.msgpack.encode(_body(m.Rollout(**_rollout())) |
                                                                          {"prompt_token_ids": _body(bad_ids)}))
    seen = []

    class Spy:
        def decode(self, raw):  # runs with the deferral on in this thread; another thread must not see it
            worker = threading.Thread(target=lambda: seen.append(m._batch.deferred))
            worker.start()
            worker.join()
            return msgspec.msgpack.Decoder(m.Rollout).decode(raw)

    assert m.decode_rollouts(Spy(), [msgspec.msgpack.encode(m.Rollout(**_rollout()))]) is not None
    assert seen == [False] and not m._batch.deferred


def _array_body(dtype: str, shape: list, nbytes: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data": b"\0" * nbytes}


_ARRAY_VARIANTS = st.sampled_from([
    ("<i4", [2], 8), ("<i4", [3], 8), ("<i4", [2], 12), ("<i4", [-2], 0), ("<i4", [2, 1], 8), ("<i4", [], 4),
    ("<i4", [1, 2, 1, 1, 1], 8), ("<f4", [2], 8), ("<i8", [2], 16), ("<i2", [2], 4), ("|u1", [8], 8),
    ("<i4", [m.MAX_TOKENS_PER_SEQUENCE + 1], 4 * (m.MAX_TOKENS_PER_SEQUENCE + 1)), ("<i4", [0], 0),
])


_FIELD_VARIANTS = {
    "rollout_id": st.sampled_from(["", "x" * 256, "x" * 257]),
    "task": st.sampled_from(["", "t", "y" * 257]),
    "group_size": st.sampled_from([0, 1, m.MAX_GROUP_SIZE, m.MAX_GROUP_SIZE + 1, -1]),
    "reward": st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), -1e300]),
    "sampling": st.one_of(  # one of its fields changed (merged into the valid sampling)
        st.fixed_dictionaries({"temperature": st.sampled_from([1.0, 0.0, -0.5, 1e-30, float("nan"), float("inf")])}),
        st.fixed_dictionaries({"max_tokens": st.sampled_from([1, 0, -3, 4096])}),
        st.fixed_dictionaries({"top_k": st.sampled_from([0, 5, -1])}),
        st.fixed_dictionaries({"top_p": st.sampled_from([1.0, 0.5, 0.0, 1.5, -0.1, float("nan")])}),
        st.fixed_dictionaries({"seed": st.sampled_from([None, 7])}),
    ),
    "prompt_token_ids": _ARRAY_VARIANTS,
    "completion_token_ids": _ARRAY_VARIANTS,
    "logprobs": _ARRAY_VARIANTS.map(lambda v: ("<f4" if v[0] == "<i4" else v[0], *v[1:])),
    "versions": _ARRAY_VARIANTS,
}


# Each rollout has at most one field changed (often none), so that a message whose only flaw is
# one rule in one rollout is common: that is where a per-message check could wrongly accept.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.just({}), st.sampled_from(sorted(_FIELD_VARIANTS)).flatmap(
    lambda key: _FIELD_VARIANTS[key].map(lambda value: {key: value}))), min_size=1, max_size=4))
def test_the_per_message_structure_check_accepts_and_refuses_exactly_what_the_record_checks_do(changes):
    """Decoding a SubmitRollouts replaces the Rollout, Array and SamplingSpec checks by one yes/no
    per rollout (messages._shape_ok): it must agree with them on every id, size, dtype, shape and
    sampling rule."""
    bodies = []
    for i, change in enumerate(changes):
        body = _body(m.Rollout(**_rollout(rollout_id=f"r{i}")))
        for key, value in change.items():
            body[key] = (_array_body(*value) if isinstance(value, tuple) else body[key] | value if key == "sampling"
                         else value)
        bodies.append(body)
    expected = _reference_outcome(bodies)
    if expected == "ok":
        assert len(wire.decode(_submit_data(bodies)).body.rollouts) == len(bodies)
    else:
        with pytest.raises(WireDecodeError) as raised:
            wire.decode(_submit_data(bodies))
        assert str(raised.value) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_envelope_encodes_to_the_bytes_of_its_body_wrapped_in_it(data):
    """wire.encode writes the envelope and its body in one pass: the bytes are those of an Envelope
    holding the separately encoded body."""
    record_type = data.draw(st.sampled_from(list(RECORD_STRATEGIES)))
    record = data.draw(RECORD_STRATEGIES[record_type])
    expected = msgspec.msgpack.encode(wire.Envelope(kind=record_type.KIND, schema=m.SCHEMA_VERSION, sender="p",
                                                    msg_id="m", body=msgspec.Raw(msgspec.msgpack.encode(record))))
    assert wire.encode(record, sender="p", msg_id="m") == expected


def _single_changes() -> list[dict]:
    """Every single-field change the property test above draws from, one by one."""
    from hypothesis.strategies import SearchStrategy

    def values(strategy: SearchStrategy) -> list:
        found = []
        wrapped = getattr(strategy, "wrapped_strategy", strategy)
        if hasattr(wrapped, "elements"):  # sampled_from
            return list(wrapped.elements)
        for sub in getattr(wrapped, "original_strategies", ()):  # one_of
            found += values(sub)
        return found

    changes = []
    for key in ("rollout_id", "task", "group_size", "reward"):
        changes += [{key: v} for v in values(_FIELD_VARIANTS[key])]
    for field, options in {"temperature": [1.0, 0.0, -0.5, 1e-30, float("nan"), float("inf")],
                           "max_tokens": [1, 0, -3, 4096], "top_k": [0, 5, -1],
                           "top_p": [1.0, 0.5, 0.0, 1.5, -0.1, float("nan")], "seed": [None, 7]}.items():
        changes += [{"sampling": {field: v}} for v in options]
    arrays = values(_ARRAY_VARIANTS)
    for key in ("prompt_token_ids", "completion_token_ids", "versions"):
        changes += [{key: v} for v in arrays]
    changes += [{"logprobs": ("<f4" if v[0] == "<i4" else v[0], *v[1:])} for v in arrays]
    return changes


@pytest.mark.parametrize("change", _single_changes(), ids=repr)
def test_each_single_rule_is_judged_per_message_as_the_record_checks_judge_it(change):
    good = _body(m.Rollout(**_rollout()))
    changed = dict(good)
    for key, value in change.items():
        changed[key] = (_array_body(*value) if isinstance(value, tuple) else good[key] | value if key == "sampling"
                        else value)
    bodies = [good, changed, good]
    expected = _reference_outcome(bodies)
    if expected == "ok":
        assert len(wire.decode(_submit_data(bodies)).body.rollouts) == 3
    else:
        with pytest.raises(WireDecodeError) as raised:
            wire.decode(_submit_data(bodies))
        assert str(raised.value) == expected
