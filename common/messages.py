"""Typed records for everything that crosses a process boundary.

Every ZeroMQ message is one `tether.common.wire.Envelope` whose body is one of the records below,
encoded as msgpack by msgspec. Decoding is typed: msgspec checks every field's type, and each
record's `__post_init__` checks the rules a type cannot express (lengths agree, versions never
decrease, ...). The record's `KIND` names it on the wire.

Wire format of a record body: a msgpack map from field name to value, unknown fields refused.
Numeric arrays travel as `Array`: a map {dtype, shape, data} where data is the raw little-endian
bytes of a C-contiguous array (numpy dtype strings such as "<i4", "<f4").

Bump `SCHEMA_VERSION` on any change a peer of the previous version would misread.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import msgspec
import numpy as np

SCHEMA_VERSION = 1

# Bounds that keep a hostile or broken peer from making a decoder allocate without limit.
MAX_ARRAY_DIMS = 4
MAX_ARRAY_BYTES = 256 * 1024 * 1024
MAX_TOKENS_PER_SEQUENCE = 1 << 20
MAX_ID_LENGTH = 256

ALLOWED_ARRAY_DTYPES = frozenset({"<i4", "<i8", "<f4", "<f8", "|u1", "|b1"})

Role = Literal["actor", "learner", "broker", "tool"]
FinishReason = Literal["stop", "length", "abort"]
ErrorCode = Literal[
    "malformed", "unknown_kind", "schema_mismatch", "too_large", "rejected", "not_registered", "internal"
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


class Array(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An n-dimensional numeric array as raw little-endian bytes with dtype and shape."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in ALLOWED_ARRAY_DTYPES:
            raise ValueError(f"array dtype {self.dtype!r} is not one of {sorted(ALLOWED_ARRAY_DTYPES)}")
        if len(self.shape) > MAX_ARRAY_DIMS:
            raise ValueError(f"array has {len(self.shape)} dimensions, at most {MAX_ARRAY_DIMS} allowed")
        if any(dim < 0 for dim in self.shape):
            raise ValueError(f"array shape {self.shape} has a negative dimension")
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
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
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


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


class SamplingSpec(Record):
    """The sampling parameters a completion was generated with; the learner replays them."""

    temperature: float
    max_tokens: int
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_finite("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 for sampled rollouts")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


class Hello(Record):
    """First message of every peer: who it is. The broker answers with Status."""

    KIND: ClassVar[str] = "hello"
    peer_id: str
    role: Role
    worker_count: int = 1
    """Number of weight-group ranks this peer contributes (vLLM workers for an actor)."""
    host: str = ""
    pid: int = 0
    loaded_version: int = -1
    """Weight version the peer holds now; -1 when it holds none from the learner yet."""

    def __post_init__(self) -> None:
        _check_id("peer_id", self.peer_id)
        if self.worker_count < 0:
            raise ValueError("worker_count must be >= 0")
        if self.loaded_version < -1:
            raise ValueError("loaded_version must be >= -1")


class Heartbeat(Record):
    """Periodic liveness signal with a little state for the version book."""

    KIND: ClassVar[str] = "heartbeat"
    peer_id: str
    seq: int
    loaded_version: int = -1
    unacked_rollouts: int = 0
    requests_in_flight: int = 0

    def __post_init__(self) -> None:
        _check_id("peer_id", self.peer_id)
        if self.seq < 0 or self.unacked_rollouts < 0 or self.requests_in_flight < 0:
            raise ValueError("seq, unacked_rollouts and requests_in_flight must be >= 0")


class Rollout(Record):
    """One completion of one prompt, with everything the learner needs to train on it.

    `logprobs[i]` is the processed logprob (after temperature, top-k, top-p) of
    `completion_token_ids[i]` under the weights of version `versions[i]`.
    """

    KIND: ClassVar[str] = "rollout"
    rollout_id: str
    """Globally unique; the broker de-duplicates by it."""
    group_id: str
    """Completions of the same prompt share it; advantages are normalised within a group."""
    group_size: int
    actor_id: str
    task: str
    prompt_token_ids: Array
    completion_token_ids: Array
    logprobs: Array
    versions: Array
    reward: float
    sampling: SamplingSpec
    finish_reason: FinishReason
    created_at: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rollout_id", "group_id", "actor_id", "task"):
            _check_id(name, getattr(self, name))
        if self.group_size < 1:
            raise ValueError("group_size must be >= 1")
        _check_vector("prompt_token_ids", self.prompt_token_ids, "<i4")
        n = _check_vector("completion_token_ids", self.completion_token_ids, "<i4")
        if _check_vector("logprobs", self.logprobs, "<f4") != n:
            raise ValueError(f"logprobs has {self.logprobs.shape[0]} entries, completion has {n}")
        if _check_vector("versions", self.versions, "<i4") != n:
            raise ValueError(f"versions has {self.versions.shape[0]} entries, completion has {n}")
        _check_finite("reward", self.reward)
        logprobs = self.logprobs.numpy()
        if not np.all(np.isfinite(logprobs)) or np.any(logprobs > 1e-4):
            raise ValueError("logprobs must be finite and <= 0")
        versions = self.versions.numpy()
        if n and (versions[0] < 0 or np.any(np.diff(versions) < 0)):
            raise ValueError("versions must be >= 0 and never decrease within a sequence")

    @property
    def num_completion_tokens(self) -> int:
        return self.completion_token_ids.shape[0]

    @property
    def min_version(self) -> int:
        """Version of the oldest weights that produced a token (-1 for an empty completion)."""
        return int(self.versions.numpy()[0]) if self.num_completion_tokens else -1


class RolloutBatch(Record):
    """Rollouts sent in one message: actor to broker, or broker to a learner rank."""

    KIND: ClassVar[str] = "rollout_batch"
    rollouts: list[Rollout]
    dropped_stale: int = 0
    """Rollouts the broker dropped for exceeding max_lag since the previous batch to this peer."""

    def __post_init__(self) -> None:
        if self.dropped_stale < 0:
            raise ValueError("dropped_stale must be >= 0")


class Ack(Record):
    """The broker stored (or already had) these rollouts; the actor may forget them."""

    KIND: ClassVar[str] = "ack"
    rollout_ids: list[str]
    duplicates: int = 0
    quota_version: int = -1
    """weights.mode=stop_the_world only: the weight version whose rollout quota `quota_left` counts
    (the broker's latest version); -1 in the in-flight mode, where there is no quota."""
    quota_left: int = -1
    """Rollouts (in whole groups) the broker still accepts at `quota_version`; 0 means full: do not
    start groups until a newer version is loaded. -1: no quota."""


class BatchRequest(Record):
    """A learner rank asks for its share of the next batch."""

    KIND: ClassVar[str] = "batch_request"
    rank: int
    size: int
    learner_version: int
    max_lag: int

    def __post_init__(self) -> None:
        if self.rank < 0 or self.size < 1 or self.learner_version < 0 or self.max_lag < 0:
            raise ValueError("rank, learner_version and max_lag must be >= 0 and size >= 1")


class TensorSpec(Record):
    """Name, shape and torch dtype name (e.g. "float32", "bfloat16") of one broadcast tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not self.name or any(dim < 0 for dim in self.shape):
            raise ValueError("tensor name must be non-empty and shape non-negative")


class WeightsAnnounce(Record):
    """Version `version` is about to be broadcast over the weight group of epoch `epoch`.

    Tensors are sent in `tensors` order, packed into buckets of at most `bucket_bytes`.
    """

    KIND: ClassVar[str] = "weights_announce"
    version: int
    epoch: int
    tensors: list[TensorSpec]
    bucket_bytes: int
    group_host: str = ""
    group_port: int = 0
    group_world_size: int = 0
    first_rank: int = 0
    """The first weight-group rank of the receiving peer (its workers take consecutive ranks)."""

    def __post_init__(self) -> None:
        if self.version < 0 or self.epoch < 0 or self.bucket_bytes < 1:
            raise ValueError("version and epoch must be >= 0 and bucket_bytes >= 1")


class VersionAck(Record):
    """An actor loaded (or failed to load) a broadcast version."""

    KIND: ClassVar[str] = "version_ack"
    peer_id: str
    version: int
    epoch: int
    ok: bool = True
    pause_seconds: float = 0.0
    error: str = ""


class StatusRequest(Record):
    """Ask the broker for a Status."""

    KIND: ClassVar[str] = "status_request"


class PeerStatus(Record):
    peer_id: str
    role: Role
    alive: bool
    loaded_version: int
    lag: int
    seconds_since_seen: float


class Status(Record):
    """The broker's view of the system: peers, versions, buffer."""

    KIND: ClassVar[str] = "status"
    peers: list[PeerStatus]
    latest_version: int
    epoch: int
    buffer_depth: int
    rollouts_per_second: float
    stored_total: int = 0
    dropped_stale_total: int = 0
    consumed_total: int = 0
    """Rollouts served to learner ranks. Every stored rollout is consumed, dropped stale or buffered:
    stored_total == consumed_total + dropped_stale_total + buffer_depth."""
    quota_version: int = -1
    """As in Ack (stop_the_world only): the version the quota counts, and what it still accepts."""
    quota_left: int = -1


class Error(Record):
    """A request could not be served; `ref_msg_id` names the message it answers."""

    KIND: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    ref_msg_id: str = ""


BODY_TYPES: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (
        Hello, Heartbeat, Rollout, RolloutBatch, Ack, BatchRequest, WeightsAnnounce,
        VersionAck, StatusRequest, Status, Error,
    )
}
"""Every record that can be the body of an Envelope, by kind."""
