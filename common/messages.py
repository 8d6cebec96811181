"""Typed records for everything that crosses a process boundary.

Every ZeroMQ message is one `tether.common.wire.Envelope` whose body is one of the records below,
encoded as msgpack by msgspec. Decoding is typed: msgspec checks every field's type, and each
record's `__post_init__` checks the rules a type cannot express (lengths agree, versions never
decrease, ...). The record's `KIND` names it on the wire; one record type has one meaning.

Wire format of a record body: a msgpack map from field name to value, unknown fields refused.
Numeric arrays travel as `Array`: a map {dtype, shape, data} where data is the raw little-endian
bytes of a C-contiguous array (numpy dtype strings such as "<i4", "<f4").

docs/wire-protocol.md lists every record below with its fields, types and rules; it is generated
from this module (`python -m tether.common.wire_reference`), so the docstrings here are the
specification. Bump `SCHEMA_VERSION` on any change a peer of the previous version would misread.
"""

from __future__ import annotations

import math
import threading
from typing import ClassVar, Literal

import msgspec
import numpy as np

SCHEMA_VERSION = 2

# Bounds that keep a hostile or broken peer from making a decoder allocate without limit.
MAX_ARRAY_DIMS = 4
MAX_ARRAY_BYTES = 256 * 1024 * 1024
MAX_TOKENS_PER_SEQUENCE = 1 << 20
MAX_ID_LENGTH = 256
MAX_GROUP_SIZE = 1 << 16
MAX_LIST_ITEMS = 1 << 16
MAX_VERSION = (1 << 31) - 1

ALLOWED_ARRAY_DTYPES = frozenset({"<i4", "<i8", "<f4", "<f8", "|u1", "|b1"})
# Built once: np.dtype(str) per array per message was a measurable part of the broker's decoding.
_NUMPY_DTYPES = {name: np.dtype(name) for name in ALLOWED_ARRAY_DTYPES}

Role = Literal["actor", "learner", "tool"]
FinishReason = Literal["stop", "length", "abort"]
ErrorCode = Literal[
    "malformed", "unknown_kind", "schema_mismatch", "too_large", "rejected", "forbidden", "not_registered",
    "internal",
]


class Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every wire record: immutable, keyword-only, strict about unknown fields."""

    KIND: ClassVar[str] = ""


def _check_id(name: str, value: str, *, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{name} is longer than {MAX_ID_LENGTH} characters")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_range(name: str, value: int, low: int, high: int = MAX_VERSION) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_list(name: str, values: list) -> None:
    if len(values) > MAX_LIST_ITEMS:
        raise ValueError(f"{name} has {len(values)} items, at most {MAX_LIST_ITEMS} allowed")


# gc=False on the rollout records (Array, SamplingSpec, Rollout): they are immutable and hold only
# strings, numbers, bytes and each other, so they can never be part of a reference cycle, and the
# collector need not track them. Tracked, they made the broker (which holds thousands in its buffer)
# run a collection every ~120 rollouts, 7-9% of its CPU.
class Array(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """An n-dimensional numeric array as raw little-endian bytes with dtype and shape.

    Rules: dtype is one of "<i4", "<i8", "<f4", "<f8", "|u1", "|b1"; at most 4 dimensions, none
    negative; at most 256 MiB; `len(data)` equals the product of the shape times the item size.
    """

    dtype: str
    """numpy dtype string: "<i4", "<i8", "<f4", "<f8", "|u1" or "|b1"."""
    shape: tuple[int, ...]
    """Dimensions (at most 4)."""
    data: bytes
    """Raw little-endian C-order bytes."""

    def __post_init__(self) -> None:
        if _batch.deferred:
            return  # a rollout's array, decoded in decode_rollouts: the rollout checks it (_shape_ok)
        if self.dtype not in ALLOWED_ARRAY_DTYPES:
            raise ValueError(f"array dtype {self.dtype!r} is not one of {sorted(ALLOWED_ARRAY_DTYPES)}")
        if len(self.shape) > MAX_ARRAY_DIMS:
            raise ValueError(f"array has {len(self.shape)} dimensions, at most {MAX_ARRAY_DIMS} allowed")
        expected = _NUMPY_DTYPES[self.dtype].itemsize
        for dim in self.shape:  # a plain loop: min()/math.prod() calls cost more for 1-4 dimensions
            if dim < 0:
                raise ValueError(f"array shape {self.shape} has a negative dimension")
            expected *= dim
        if expected > MAX_ARRAY_BYTES:
            raise ValueError(f"array of shape {self.shape} exceeds {MAX_ARRAY_BYTES} bytes")
        if expected != len(self.data):
            raise ValueError(
                f"array data has {len(self.data)} bytes, shape {self.shape} of {self.dtype} needs {expected}"
            )

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Array:
        """Wrap a numpy array, converting it to little-endian C order if needed."""
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(dtype=little.dtype.str, shape=tuple(little.shape), data=little.tobytes())

    def numpy(self) -> np.ndarray:
        """A read-only numpy view of the data (no copy)."""
        array = np.frombuffer(self.data, dtype=_NUMPY_DTYPES.get(self.dtype) or np.dtype(self.dtype))
        # __post_init__ checked that the data holds exactly the shape: a vector needs no reshape.
        return array if len(self.shape) == 1 else array.reshape(self.shape)


def int32_array(values) -> Array:
    return Array.from_numpy(np.asarray(values, dtype=np.int32))


def float32_array(values) -> Array:
    return Array.from_numpy(np.asarray(values, dtype=np.float32))


def _check_vector(name: str, array: Array, dtype: str) -> int:
    if array.dtype != dtype or len(array.shape) != 1:
        raise ValueError(f"{name} must be a 1-D {dtype} array, got {array.dtype} of shape {array.shape}")
    if array.shape[0] > MAX_TOKENS_PER_SEQUENCE:
        raise ValueError(f"{name} has {array.shape[0]} entries, at most {MAX_TOKENS_PER_SEQUENCE} allowed")
    return array.shape[0]


def _never_decreasing_from_zero(data: bytes, n: int) -> bool:
    """Whether the n "<i4" values in `data` are >= 0 and never decrease."""
    first = data[:4]
    if int.from_bytes(first, "little", signed=True) < 0:
        return False
    if data == first * n:  # one version for the whole completion, the common case: no numpy
        return True
    versions = np.frombuffer(data, dtype="<i4")
    return not (versions[1:] < versions[:-1]).any()


# ------------------------------------------------------------------------------------ rollouts


class _Batch(threading.local):
    deferred = False
    """True while this thread decodes the rollouts of one message in `decode_rollouts`."""


_batch = _Batch()


def _shape_ok(r: Rollout) -> bool:
    """Whether `r` passes every check of `Rollout.__post_init__`, of its arrays'
    `Array.__post_init__` and of its `SamplingSpec.__post_init__`, except those on the array
    contents (`_contents_ok`): ids, group_size, reward, sampling parameters, and each array a 1-D
    vector of the right dtype whose data matches its shape. One function instead of about a dozen
    calls per rollout; tests/test_wire.py holds it to the checks it stands for."""
    sampling = r.sampling
    temperature = sampling.temperature
    if not (math.isfinite(temperature) and temperature > 0 and sampling.top_k >= 0 and 0.0 < sampling.top_p <= 1.0
            and sampling.max_tokens >= 1):
        return False
    for value in (r.rollout_id, r.group_id, r.actor_id, r.task):
        if not 0 < len(value) <= MAX_ID_LENGTH:
            return False
    if not 1 <= r.group_size <= MAX_GROUP_SIZE:
        return False
    prompt, completion, logprobs, versions = r.prompt_token_ids, r.completion_token_ids, r.logprobs, r.versions
    if prompt.dtype != "<i4" or completion.dtype != "<i4" or logprobs.dtype != "<f4" or versions.dtype != "<i4":
        return False
    shape = prompt.shape
    if len(shape) != 1 or not 0 <= shape[0] <= MAX_TOKENS_PER_SEQUENCE or len(prompt.data) != 4 * shape[0]:
        return False
    shape = completion.shape
    if len(shape) != 1 or not 0 <= shape[0] <= MAX_TOKENS_PER_SEQUENCE or logprobs.shape != shape \
            or versions.shape != shape:
        return False
    size = 4 * shape[0]
    return len(completion.data) == size and len(logprobs.data) == size and len(versions.data) == size \
        and math.isfinite(r.reward)


def _contents_ok(rollouts: list[Rollout]) -> int | None:
    """Whether every rollout passes the content checks of `Rollout.__post_init__`, checked for
    all of them at once: the same rules (token ids >= 0; logprobs finite and <= 0 up to 1e-4 of
    rounding; versions >= 0, never decreasing), with three numpy reductions per message instead of
    six per rollout.
    Assumes `_shape_ok` held for each. Returns the largest token id (-1: none), or None when a
    rule is broken."""
    max_id = -1
    ids = b"".join([data for r in rollouts for data in (r.prompt_token_ids.data, r.completion_token_ids.data)])
    if ids:
        # As unsigned, a negative int32 is >= 2**31: one max checks every id of the message.
        max_id = int(np.frombuffer(ids, dtype="<u4").max())
        if max_id >= 1 << 31:
            return None
    logprobs = b"".join([r.logprobs.data for r in rollouts])
    if logprobs:
        values = np.frombuffer(logprobs, dtype="<f4")
        if not (-math.inf < values.min() and values.max() <= 1e-4):
            return None
    for r in rollouts:
        data = r.versions.data
        if data and not _never_decreasing_from_zero(data, len(data) >> 2):
            return None
    return max_id


def decode_rollouts(decoder: msgspec.msgpack.Decoder, raws: list) -> tuple[list[Rollout], int] | None:
    """Decode each of `raws` with `decoder` (a Rollout decoder), checking the array contents once
    for all of them. Returns the rollouts and their largest token id (-1: none), or None when any
    rollout breaks a rule (decode them one by one, with the checks per rollout, for the exact
    error). A rollout's structural checks may also raise."""
    previous, _batch.deferred = _batch.deferred, True
    try:
        rollouts = [decoder.decode(raw) for raw in raws]
    finally:
        _batch.deferred = previous
    max_id = _contents_ok(rollouts)
    return (rollouts, max_id) if max_id is not None else None


class SamplingSpec(Record, gc=False):
    """The sampling parameters a completion was generated with; the learner replays them.

    Rules: temperature finite and > 0; top_k >= 0; top_p in (0, 1]; max_tokens >= 1.
    """

    temperature: float
    """Softmax temperature (> 0)."""
    max_tokens: int
    """Completion length limit."""
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    """1 disables top-p."""
    seed: int | None = None
    """The per-request sampling seed (reproducibility only)."""

    def __post_init__(self) -> None:
        if _batch.deferred:
            return  # a rollout's, decoded in decode_rollouts: the rollout checks it (_shape_ok)
        _check_finite("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 for sampled rollouts")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


class Rollout(Record, gc=False):
    """One completion of one prompt, with everything the learner needs to train on it.

    `logprobs[i]` is the processed logprob (after temperature, top-k, top-p) of
    `completion_token_ids[i]` under the weights of version `versions[i]`.

    Rules checked by the decoder: ids non-empty, at most 256 characters; 1 <= group_size <= 65536;
    token arrays are 1-D "<i4" with non-negative ids, logprobs and versions 1-D "<f4"/"<i4" of the
    completion's length; logprobs finite and <= 0 (up to 1e-4 of rounding); versions >= 0 and never
    decreasing; reward finite. Rules the broker checks against the run (docs/wire-protocol.md, "Validation"):
    actor_id equals the sender, group_size equals actor.sampling.group_size, completion length <=
    actor.sampling.max_tokens, token ids below the model's vocabulary size, versions <= the
    latest published version.
    """

    rollout_id: str
    """Globally unique; the broker de-duplicates by it."""
    group_id: str
    """Completions of the same prompt share it; advantages are normalised within a group."""
    group_size: int
    """Completions in the group; a group is served to a learner only once all of them arrived."""
    actor_id: str
    """The actor that generated it (must equal the envelope's sender)."""
    task: str
    """Name of the task that scored it."""
    prompt_token_ids: Array
    """Prompt tokens ("<i4")."""
    completion_token_ids: Array
    """Sampled tokens ("<i4")."""
    logprobs: Array
    """Processed logprob of each completion token ("<f4")."""
    versions: Array
    """Weight version that sampled each completion token ("<i4")."""
    reward: float
    """The task's reward for the completion."""
    sampling: SamplingSpec
    """How the completion was sampled (the learner replays it)."""
    finish_reason: FinishReason
    """stop, length or abort."""
    created_at: float = 0.0
    """Unix time the completion finished (information only)."""

    def __post_init__(self) -> None:
        if _batch.deferred:
            # Decoded as part of a SubmitRollouts (decode_rollouts): the same rules as below, as one
            # yes/no per rollout here and for the array contents once per message; on a no the
            # message is decoded again with the checks below, which name the rule broken.
            if not _shape_ok(self):
                raise ValueError("rollout breaks a rule")
            return
        for name in ("rollout_id", "group_id", "actor_id", "task"):
            _check_id(name, getattr(self, name))
        _check_range("group_size", self.group_size, 1, MAX_GROUP_SIZE)
        _check_vector("prompt_token_ids", self.prompt_token_ids, "<i4")
        n = _check_vector("completion_token_ids", self.completion_token_ids, "<i4")
        if _check_vector("logprobs", self.logprobs, "<f4") != n:
            raise ValueError(f"logprobs has {self.logprobs.shape[0]} entries, completion has {n}")
        if _check_vector("versions", self.versions, "<i4") != n:
            raise ValueError(f"versions has {self.versions.shape[0]} entries, completion has {n}")
        for name in ("prompt_token_ids", "completion_token_ids"):
            ids = getattr(self, name).numpy()
            if ids.size and int(ids.min()) < 0:
                raise ValueError(f"{name} holds a negative token id")
        _check_finite("reward", self.reward)
        # min and max instead of temporaries (the broker checks every rollout it receives): both
        # propagate NaN, and NaN fails both comparisons, as do -inf and +inf.
        if n:
            logprobs = self.logprobs.numpy()
            if not (-math.inf < logprobs.min() and logprobs.max() <= 1e-4):
                raise ValueError("logprobs must be finite and <= 0 (1e-4 of rounding allowed)")
            if not _never_decreasing_from_zero(self.versions.data, n):
                raise ValueError("versions must be >= 0 and never decrease within a sequence")

    @property
    def num_completion_tokens(self) -> int:
        return self.completion_token_ids.shape[0]

    # Versions are a checked "<i4" vector that never decreases: its first and last four bytes are
    # the oldest and newest version (read directly: the broker asks for them per rollout).
    @property
    def min_version(self) -> int:
        """Version of the oldest weights that produced a token (-1 for an empty completion)."""
        data = self.versions.data
        return int.from_bytes(data[:4], "little", signed=True) if data else -1

    @property
    def max_version(self) -> int:
        """Version of the newest weights that produced a token (-1 for an empty completion)."""
        data = self.versions.data
        return int.from_bytes(data[-4:], "little", signed=True) if data else -1


class TensorSpec(Record):
    """Name, shape and torch dtype name (e.g. "float32", "bfloat16") of one broadcast tensor.

    Rules: name non-empty, shape non-negative.
    """

    name: str
    """Hugging Face parameter name."""
    shape: tuple[int, ...]
    """Dimensions."""
    dtype: str
    """torch dtype name, e.g. "float32", "bfloat16"."""

    def __post_init__(self) -> None:
        if not self.name or any(dim < 0 for dim in self.shape):
            raise ValueError("tensor name must be non-empty and shape non-negative")


# ------------------------------------------------------------------------------------ any peer


class Hello(Record):
    """First message of every peer (and again after the broker forgets it): who it is.

    The broker answers with Welcome, or Error `forbidden` (role not allowed for the sender's
    CURVE key), `rejected` (max_peers reached) or `malformed` (peer_id differs from the sender).
    Rules: peer_id equals the envelope's sender; incarnation non-empty; worker_count >= 0;
    loaded_version >= 0; committed_version >= -1.
    """

    KIND: ClassVar[str] = "hello"
    peer_id: str
    """Unique id of the peer (e.g. actor-3, learner-0); must equal the envelope sender."""
    role: Role
    """actor, learner or tool. With CURVE, the client key must be authorized for this role."""
    incarnation: str
    """Random id of this process start. A new incarnation of a known peer id is a restart: an actor
    forces a new weight-group epoch; a learner opens a new training session (see `session`)."""
    rank: int = 0
    """Learner: the torchrun rank. Others: 0."""
    session: str = ""
    """Learner: id of the training session, shared by all ranks of one torchrun launch. A new
    session forks the version lineage at `loaded_version` and takes back leases of old sessions."""
    worker_count: int = 1
    """Actor: weight-group ranks it contributes (its vLLM workers)."""
    host: str = ""
    """Host name (information only)."""
    pid: int = 0
    """Process id (information only)."""
    loaded_version: int = 0
    """Actor: version its engine holds (0 = the model on disk). Learner: its current version."""
    loaded_lineage: str = ""
    """Actor: lineage (learner session) of `loaded_version`, from the WeightUpdate that loaded it;
    empty for the model on disk."""
    committed_version: int = -1
    """Learner: version of the checkpoint it resumed from or last saved (-1: none)."""

    def __post_init__(self) -> None:
        _check_id("peer_id", self.peer_id)
        _check_id("incarnation", self.incarnation)
        _check_id("session", self.session, allow_empty=True)
        _check_id("loaded_lineage", self.loaded_lineage, allow_empty=True)
        _check_id("host", self.host, allow_empty=True)
        _check_range("rank", self.rank, 0)
        _check_range("worker_count", self.worker_count, 0, 1 << 16)
        _check_range("loaded_version", self.loaded_version, 0)
        _check_range("committed_version", self.committed_version, -1)


class Welcome(Record):
    """The broker registered the peer (reply to Hello)."""

    KIND: ClassVar[str] = "welcome"
    broker_incarnation: str
    """Random id of the broker process; changes when the broker restarts."""
    latest_version: int
    """Newest version the learner published (the version book)."""
    lineage: str
    """Current version lineage (learner session id; empty before any learner registered)."""
    ready: bool
    """Actor: its rollouts are accepted now (it holds a version of the current lineage)."""


class Heartbeat(Record):
    """Periodic liveness signal; a peer silent for broker.peer_timeout_s is declared dead.

    No reply, or Error `not_registered` when the broker does not know the peer (send Hello again).
    """

    KIND: ClassVar[str] = "heartbeat"
    seq: int
    """Increasing per connection (information only)."""

    def __post_init__(self) -> None:
        _check_range("seq", self.seq, 0, (1 << 63) - 1)


class StatusRequest(Record):
    """Ask the broker for a Status (needs no Hello)."""

    KIND: ClassVar[str] = "status_request"


class PeerStatus(Record):
    """One peer in Status."""

    peer_id: str
    """The peer."""
    role: Role
    """Its role."""
    alive: bool
    """Heard from within broker.peer_timeout_s."""
    loaded_version: int
    """Actors: version held (-1 when it holds none of the current lineage). Learner ranks: their
    current version."""
    lag: int
    """Actors: latest_version - loaded_version (0 for others)."""
    ready: bool
    """Actors: rollouts accepted now."""
    seconds_since_seen: float
    """Since its last message."""


class Status(Record):
    """The broker's view of the system: peers, versions, the rollout ledger.

    The books balance at all times and across broker restarts (counters are journaled):
    stored_total == consumed_total + dropped_stale_total + buffer_depth + leased.
    """

    KIND: ClassVar[str] = "status"
    broker_incarnation: str
    """Random id of the broker process."""
    peers: list[PeerStatus]
    """Every known peer, dead ones for a while too."""
    latest_version: int
    """Newest version the learner published."""
    lineage: str
    """Current lineage (learner session id)."""
    epoch: int
    """Weight-group epoch of the newest update."""
    committed_version: int
    """Newest checkpoint version the learner committed (-1: none)."""
    buffer_depth: int
    """Rollouts stored and not yet handed to a learner."""
    leased: int
    """Rollouts handed to learner ranks and not yet committed with a checkpoint."""
    rollouts_per_second: float
    """Stored rollouts per second over the last 10 s."""
    stored_total: int
    """Rollouts acked to actors (first arrival of each id)."""
    consumed_total: int
    """Rollouts committed: trained on by a checkpointed learner version."""
    dropped_stale_total: int
    """Rollouts dropped: older than max_lag when served, stale on arrival (stop_the_world),
    generated by an abandoned lineage, or incomplete groups of a dead actor."""
    granted_groups: int
    """Groups actors may still start (generation grants not yet delivered)."""
    update_in_flight: bool
    """Whether a weight update is running."""


class Error(Record):
    """A request could not be served; `ref_msg_id` names the message it answers."""

    KIND: ClassVar[str] = "error"
    code: ErrorCode
    """malformed, unknown_kind, schema_mismatch, too_large, rejected, forbidden, not_registered or
    internal."""
    message: str
    """What was wrong, for people."""
    ref_msg_id: str = ""
    """msg_id of the message this answers (empty if unknown)."""


# ------------------------------------------------------------------------------------ actors


class SubmitRollouts(Record):
    """Actor -> broker: store these rollouts. Reply: Ack (always exactly one).

    Rules: at most 65536 rollouts (and broker.max_message_bytes). Each rollout is validated on its
    own; a bad one is named in Ack.invalid and never affects the others.
    """

    KIND: ClassVar[str] = "submit_rollouts"
    rollouts: list[Rollout]
    """Rollouts in any order; a group may span several messages."""

    def __post_init__(self) -> None:
        _check_list("rollouts", self.rollouts)


class RolloutRejection(Record):
    """One rollout the broker will never accept, and why."""

    rollout_id: str
    """The refused rollout."""
    reason: str
    """The rule it breaks."""


class Ack(Record):
    """Broker -> actor: the fate of every rollout of one SubmitRollouts.

    Each submitted id appears in exactly one of `acked`, `retry` or `invalid`.
    """

    KIND: ClassVar[str] = "ack"
    acked: list[str]
    """Stored now, already held, or dropped as stale on arrival: the actor may forget them."""
    duplicates: int = 0
    """How many of `acked` the broker already had."""
    dropped_stale: int = 0
    """How many of `acked` were dropped as stale on arrival (counted in Status)."""
    retry: list[str] = []
    """Not accepted now (buffer full, or the actor does not hold the current weights): keep them
    and send them again later."""
    retry_reason: str = ""
    """Why `retry` ids were not accepted."""
    invalid: list[RolloutRejection] = []
    """Never acceptable (they break a validation rule): forget them and report the reason."""


class GenerationRequest(Record):
    """Actor -> broker: may I start `groups` more groups? Parked until at least one can be granted.

    Admission by version: a group is granted only if its rollouts can reach the learner within
    learner.max_lag (see docs/wire-protocol.md, "Admission"). A newer request from the same actor
    replaces its parked one. Rules: 1 <= groups <= 65536.
    """

    KIND: ClassVar[str] = "generation_request"
    seq: int
    """Increasing per actor; the grant answering it carries it back."""
    groups: int
    """How many more groups the actor would start now."""

    def __post_init__(self) -> None:
        _check_range("groups", self.groups, 1, MAX_LIST_ITEMS)
        _check_range("seq", self.seq, 0, (1 << 63) - 1)


class GenerationGrant(Record):
    """Broker -> actor (reply to GenerationRequest): start this many groups now."""

    KIND: ClassVar[str] = "generation_grant"
    seq: int
    """The request this answers (a request may be answered by several grants)."""
    groups: int
    """Groups the actor may start now (>= 1)."""
    version: int
    """The version the grant was computed for (the actor's loaded version)."""


# ------------------------------------------------------------------------------------ learner


class BatchRequest(Record):
    """Learner rank -> broker: lease `size` rollouts (whole groups) for the step at `learner_version`.

    Parked until enough complete, fresh groups are buffered. Re-sending the same (rank, seq) after a
    lost reply or a broker restart is answered with the same lease. Only learner peers may ask.
    Rules: size >= 1 and at most broker.buffer_capacity; learner_version within
    [latest_version, latest_version + learner.publish_interval] of the broker's version book.
    """

    KIND: ClassVar[str] = "batch_request"
    rank: int
    """The learner's torchrun rank (equals the sender's Hello rank)."""
    seq: int
    """Per rank and session, increasing: a new seq asks for a new lease."""
    size: int
    """Rollouts wanted, in whole groups (a group larger than size is served alone)."""
    learner_version: int
    """The learner's version: the batch trains the step from this version to the next."""
    max_lag: int
    """learner.max_lag: groups with a token older than learner_version - max_lag are dropped
    (counted) before serving."""

    def __post_init__(self) -> None:
        _check_range("rank", self.rank, 0)
        _check_range("seq", self.seq, 0, (1 << 63) - 1)
        _check_range("size", self.size, 1, 1 << 24)
        _check_range("learner_version", self.learner_version, 0)
        _check_range("max_lag", self.max_lag, 0)


class RolloutBatch(Record):
    """Broker -> learner rank (reply to BatchRequest): a lease of whole groups.

    The rollouts stay leased to the learner's session until it commits a checkpoint at a version
    above `learner_version` (then they count as consumed) or a new session takes them back.
    """

    KIND: ClassVar[str] = "rollout_batch"
    seq: int
    """The BatchRequest this answers."""
    learner_version: int
    """The step the lease is for (its BatchRequest.learner_version)."""
    rollouts: list[Rollout]
    """Whole groups."""
    dropped_stale: int = 0
    """Rollouts the broker dropped as stale since the previous batch it served (to any rank)."""


class PublishRequest(Record):
    """Learner rank 0 -> broker: the learner holds `version` and can broadcast it now.

    Reply: WeightUpdate (broadcast now, as group rank 0) or PublishDeferred. Rules: only learner
    rank 0 of the current session; version >= latest_version; at least one tensor;
    bucket_bytes >= 1.
    """

    KIND: ClassVar[str] = "publish_request"
    version: int
    """The learner's current version (optimizer steps taken)."""
    tensors: list[TensorSpec]
    """What will be broadcast, in order (Hugging Face names, shapes, dtypes)."""
    bucket_bytes: int
    """Bucket size of the broadcast (both sides compute the same bucket plan)."""

    def __post_init__(self) -> None:
        _check_range("version", self.version, 0)
        if not self.tensors:
            raise ValueError("tensors must not be empty")
        _check_list("tensors", self.tensors)
        _check_range("bucket_bytes", self.bucket_bytes, 1, 1 << 40)


class PublishDeferred(Record):
    """Broker -> learner rank 0 (reply to PublishRequest): no broadcast now.

    The version is recorded as published. When actors need weights later (an update finished, an
    actor joined or came back), the broker sends PublishWanted.
    """

    KIND: ClassVar[str] = "publish_deferred"
    version: int
    """The version the request offered (recorded as the latest)."""
    reason: str
    """Why nothing is broadcast now."""


class PublishWanted(Record):
    """Broker -> learner rank 0: actors need weights; send PublishRequest for your current version
    as soon as you can (between steps, or while waiting for a batch)."""

    KIND: ClassVar[str] = "publish_wanted"
    latest_version: int
    """The broker's latest version."""
    reason: str
    """Which actors lack it."""


class WeightUpdate(Record):
    """Broker -> every member of a weight-group epoch: transfer `version` now.

    The learner (group rank 0) gets it as the reply to its PublishRequest and broadcasts; each
    actor worker receives as rank first_rank + its worker rank. Members join the group by
    rendezvous on the TCPStore at group_host:group_port under the key prefix `group_key`, which
    names this epoch and carries a random secret (only members learn it). Every member answers
    with UpdateReport.
    """

    KIND: ClassVar[str] = "weight_update"
    version: int
    """The version to transfer."""
    lineage: str
    """Lineage (learner session) the version belongs to."""
    epoch: int
    """Weight-group epoch number (never repeats)."""
    group_key: str
    """Rendezvous key prefix of the epoch on the TCPStore (includes a random secret)."""
    group_host: str
    """Address of the TCPStore (the broker host)."""
    group_port: int
    """Port of the TCPStore (broker.store_port)."""
    world_size: int
    """1 (the learner) + the workers of every receiving actor."""
    first_rank: int
    """The receiver's first group rank (its workers take consecutive ranks); 0 for the learner."""
    tensors: list[TensorSpec]
    """The tensors in broadcast order."""
    bucket_bytes: int
    """Bucket size (see tether.common.weight_group.bucket_plan)."""
    discard_above: int = -1
    """Actors: tokens generated with a version above this belong to an abandoned lineage (the
    learner resumed from an older checkpoint): discard unsent rollouts and running groups that
    hold one. -1: nothing to discard."""


class UpdateReport(Record):
    """Member -> broker: the outcome of one WeightUpdate (actors: loaded; learner: broadcast)."""

    KIND: ClassVar[str] = "update_report"
    version: int
    """The WeightUpdate this reports on."""
    epoch: int
    """Its epoch."""
    ok: bool = True
    """Loaded (actor) or broadcast (learner) completely."""
    seconds: float = 0.0
    """Actors: the generation pause; learner: gather plus broadcast."""
    error: str = ""
    """Why not, when ok is false."""

    def __post_init__(self) -> None:
        _check_finite("seconds", self.seconds)


class Commit(Record):
    """Learner rank 0 -> broker: the checkpoint at `version` is complete.

    Every rollout leased to this session for a step below `version` becomes consumed. Reply:
    CommitAck. Idempotent; only learner rank 0 of the current session.
    """

    KIND: ClassVar[str] = "commit"
    version: int
    """Version of the completed checkpoint."""

    def __post_init__(self) -> None:
        _check_range("version", self.version, 0)


class CommitAck(Record):
    """Broker -> learner rank 0 (reply to Commit)."""

    KIND: ClassVar[str] = "commit_ack"
    version: int
    """The Commit this answers."""
    consumed: int
    """Rollouts this commit turned from leased into consumed."""


BODY_TYPES: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (
        Hello, Welcome, Heartbeat, StatusRequest, Status, Error,
        SubmitRollouts, Ack, GenerationRequest, GenerationGrant,
        BatchRequest, RolloutBatch, PublishRequest, PublishDeferred, PublishWanted,
        WeightUpdate, UpdateReport, Commit, CommitAck,
    )
}
"""Every record that can be the body of an Envelope, by kind."""
