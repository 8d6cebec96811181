"""The weight broadcast: learner rank 0 sends named tensors to every actor worker, in buckets.

A weight group is formed per epoch (the broker opens a new epoch whenever the set of receivers
changes) without touching torch.distributed's default process group, so a learner launched by
torchrun and a vLLM worker (which has its own default group) can both join it:

- every participant connects as a client to the broker's TCPStore (the broker is its master),
- keys are namespaced by ``PrefixStore(group_key, store)``; the broker makes each epoch's key
  unique (broker incarnation, epoch number) and unguessable (a random secret only members learn),
  so a new epoch never reads a stale key of an old one and outsiders cannot join,
- a gloo (CPU) or NCCL (CUDA) backend object is built directly on that store; it is used for
  broadcast only and never registered globally.

Failure semantics are explicit on both backends: joining and every broadcast wait at most
`timeout_s` and then raise; the caller `abort()`s the group and the broker re-forms the epoch. On
NCCL the communicator is built with TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (abort the communicator on an
error, never tear the process down, unlike the default 3), the wait is a blocking CPU wait with the
timeout, and `abort()` aborts the communicator, so a dead actor costs one failed update, not the
learner process.

Wire layout: tensors travel in the order of the announced specs, packed into buckets of at most
`bucket_bytes` bytes (a single tensor larger than that gets a bucket of its own). A bucket is one
flat uint8 buffer; each tensor sits at an offset aligned to `ALIGN` bytes, as its raw bytes. Sending
bytes rather than typed tensors keeps bf16 (and any dtype) bit-identical over every backend.

Both sides compute the same `bucket_plan(specs, bucket_bytes)`, so only data crosses the wire.
Every collective has a timeout: a dead peer makes the others fail with an error instead of hanging.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from tether.common.messages import TensorSpec
from tether.common.process import environment_set

ALIGN = 64
"""Byte alignment of each tensor inside a bucket (any dtype can view an aligned slice)."""

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype for a TensorSpec dtype name ("float32", "bfloat16", or "torch.float32")."""
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r}; known: {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype))


def tensor_specs(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    """The specs to announce for `named_tensors`, in the order they will be broadcast."""
    return [spec_of(name, tensor) for name, tensor in named_tensors]


def spec_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * dtype_from_name(spec.dtype).itemsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class BucketEntry:
    spec: TensorSpec
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    entries: tuple[BucketEntry, ...]
    nbytes: int
    """Buffer size: end of the last entry (the buffer is not padded after it)."""


def bucket_plan(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Pack `specs` in order into buckets of at most `bucket_bytes` bytes.

    Deterministic, so sender and receivers agree from the announced specs alone. A tensor larger
    than `bucket_bytes` is sent alone in an oversized bucket rather than split.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[Bucket] = []
    entries: list[BucketEntry] = []
    end = 0
    for spec in specs:
        nbytes = spec_nbytes(spec)
        offset = _aligned(end) if entries else 0
        if entries and offset + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(entries), end))
            entries, offset = [], 0
        entries.append(BucketEntry(spec, offset, nbytes))
        end = offset + nbytes
    if entries:
        buckets.append(Bucket(tuple(entries), end))
    return buckets


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """auto -> nccl when the device (or, without one, the machine) is CUDA, else gloo."""
    if backend != "auto":
        return backend
    if device is not None:
        return "nccl" if torch.device(device).type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class WeightGroup:
    """One participant's membership of the weight group of one epoch. Rank 0 is the sender."""

    key: str
    """The epoch's rendezvous key (WeightUpdate.group_key)."""
    rank: int
    world_size: int
    backend: str
    device: torch.device
    timeout_s: float
    _pg: object = field(repr=False)
    _store: object = field(repr=False)

    def broadcast_(self, buffer: torch.Tensor) -> None:
        """In-place broadcast of `buffer` from rank 0; raises after `timeout_s` (then `abort()`)."""
        if self._pg is None:
            raise RuntimeError(f"weight group {self.key} was closed")
        timeout = timedelta(seconds=self.timeout_s)
        work = self._pg.broadcast(buffer, 0, timeout)
        # With a timeout, wait() blocks the CPU until the collective completes or raises, on NCCL too.
        work.wait(timeout)
        if self.device.type == "cuda":
            # wait() only orders the calling thread's current stream after NCCL's; synchronising that
            # stream makes the bytes complete before a timer is read or another thread reads the
            # buffer. Not the whole device: an actor receives on a side stream of a background
            # thread while its engine keeps computing on the default stream.
            torch.cuda.current_stream(self.device).synchronize()

    def abort(self) -> None:
        """Tear the group down after a failure (or when the epoch ends); it cannot be used again."""
        pg, self._pg = self._pg, None
        if pg is None:
            return
        for method in ("abort", "shutdown"):
            if hasattr(pg, method):
                try:
                    getattr(pg, method)()
                    return
                except Exception:  # a peer already gone: nothing left to release cleanly
                    continue

    close = abort

    def __enter__(self) -> WeightGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def join_weight_group(
    host: str,
    port: int,
    key: str,
    rank: int,
    world_size: int,
    backend: str = "auto",
    device: torch.device | str | None = None,
    timeout_s: float = 120.0,
    store: dist.Store | None = None,
) -> WeightGroup:
    """Join the weight group rendezvousing under `key` on the TCPStore at host:port (the broker's).

    Blocks until all `world_size` ranks have joined or `timeout_s` passes. `store` may be given
    instead of host/port (e.g. a process that already holds a client of the broker's store).
    The default process group is neither needed nor touched.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the weight group of size {world_size}")
    backend = resolve_backend(backend, device)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(key, store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif backend == "nccl":
        pg = _nccl_group(prefixed, rank, world_size, timeout)
    else:
        raise ValueError(f"unsupported weight group backend {backend!r} (gloo or nccl)")
    group = WeightGroup(key, rank, world_size, backend, device, timeout_s, pg, store)
    if backend == "nccl":
        # NCCL connects lazily; a tiny broadcast now makes a join failure show up here, not mid-update.
        group.broadcast_(torch.zeros(1, dtype=torch.uint8, device=device))
    return group


def _nccl_group(store: dist.Store, rank: int, world_size: int, timeout: timedelta):
    """A ProcessGroupNCCL whose errors abort its communicator instead of the process.

    The error-handling mode is read from the environment when the group is built; it is set for
    this construction only, so torchrun's training group keeps whatever the user chose.
    """
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    with environment_set(_NCCL_ERROR_HANDLING, "2", keep_existing=False):
        return dist.ProcessGroupNCCL(store, rank, world_size, options)


_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


@dataclass
class TransferStats:
    """What one broadcast moved and how long it took (seconds)."""

    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    fill_s: float = 0.0
    """Sender: producing the tensors (e.g. FSDP all-gathers) and copying them into the buckets."""
    broadcast_s: float = 0.0
    """Sender: the broadcasts themselves."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class WeightTransferError(RuntimeError):
    """A broadcast of the weight group failed; the group is aborted."""


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)


class WeightSender:
    """Rank 0 of a weight group: packs tensors into bucket buffers and broadcasts bucket by bucket.

    The buffers are allocated once per plan (per epoch, since a sender lives with its group), not
    per update.
    """

    def __init__(self, group: WeightGroup, bucket_bytes: int):
        if group.rank != 0:
            raise ValueError(f"WeightSender must be rank 0 of the weight group, got rank {group.rank}")
        self.group = group
        self.bucket_bytes = bucket_bytes
        self._plan: list[Bucket] = []
        self._plan_specs: list[TensorSpec] | None = None
        self._buffers: list[torch.Tensor] = []

    def broadcast(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> TransferStats:
        """Send `named_tensors` (the same order and shapes as the announced specs)."""
        tensors = dict(named_tensors)
        return self.send(tensor_specs(named_tensors), lambda spec: tensors[spec.name])

    def send(self, specs: Sequence[TensorSpec], tensor_of: Callable[[TensorSpec], torch.Tensor]) -> TransferStats:
        """Send the tensors `tensor_of(spec)` returns, in `specs` order, converted to each spec's dtype.

        `tensor_of` is called exactly once per spec, in order, even after a broadcast failed (it may
        be a collective of the learner ranks, which must stay in lockstep); the failure is raised as
        WeightTransferError at the end, and the group is aborted.
        """
        start = time.perf_counter()
        self._prepare(list(specs))
        stats = TransferStats(tensors=len(specs))
        error: Exception | None = None
        for bucket, buffer in zip(self._plan, self._buffers, strict=True):
            t0 = time.perf_counter()
            for entry in bucket.entries:
                tensor = tensor_of(entry.spec)
                if error is None:
                    raw = _as_bytes(tensor.to(dtype_from_name(entry.spec.dtype)))
                    buffer[entry.offset:entry.offset + entry.nbytes].copy_(raw.to(buffer.device, non_blocking=True))
                del tensor
            if buffer.is_cuda:  # the copies above are asynchronous: fill_s is read once they are done
                torch.cuda.current_stream(buffer.device).synchronize()
            t1 = time.perf_counter()
            stats.fill_s += t1 - t0
            if error is None:
                try:
                    self.group.broadcast_(buffer)
                except Exception as exc:
                    error = exc
                    self.group.abort()
            stats.broadcast_s += time.perf_counter() - t1
            stats.buckets += 1
            stats.bytes += bucket.nbytes
        stats.seconds = time.perf_counter() - start
        if error is not None:
            raise WeightTransferError(f"broadcast to weight group {self.group.key} failed: {error}") from error
        return stats

    def _prepare(self, specs: list[TensorSpec]) -> None:
        if specs != self._plan_specs:
            self._plan = bucket_plan(specs, self.bucket_bytes)
            self._buffers = [torch.empty(b.nbytes, dtype=torch.uint8, device=self.group.device) for b in self._plan]
            self._plan_specs = specs


class WeightReceiver:
    """A rank > 0 of a weight group: receives the announced tensors into bucket buffers.

    Bucket buffers are allocated once per plan and reused by later updates of the same group, so
    keep one receiver per group (epoch). Two ways to take an update:

    - `receive()` yields each tensor as its bucket arrives (streaming into a consumer);
    - `receive_all()` fills every bucket first and `tensors()` then reads them, so the transfer can
      finish (e.g. on a background thread while the engine keeps generating) before the consumer
      touches anything. The buffers hold one full copy of the update either way.
    """

    def __init__(self, group: WeightGroup):
        if group.rank == 0:
            raise ValueError("rank 0 is the sender of the weight group")
        self.group = group
        self.stats = TransferStats()
        self._plan: list[Bucket] = []
        self._plan_key: tuple | None = None
        self._buffers: list[torch.Tensor] = []

    def receive(self, specs: Sequence[TensorSpec], bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every announced tensor, bucket by bucket, as it arrives.

        The tensors are views of this receiver's bucket buffers: valid until the next `receive`.
        The iterator must be consumed completely: every rank takes part in every bucket.
        `stats.broadcast_s` is the time spent receiving; the rest of `stats.seconds` is the consumer's.
        """
        start = time.perf_counter()
        self._prepare(specs, bucket_bytes)
        for bucket, buffer in zip(self._plan, self._buffers, strict=True):
            self._receive_bucket(bucket, buffer)
            yield from _views(bucket, buffer)
        self.stats.seconds = time.perf_counter() - start

    def receive_all(self, specs: Sequence[TensorSpec], bucket_bytes: int) -> TransferStats:
        """Receive every bucket of the update; `tensors()` then reads them."""
        start = time.perf_counter()
        self._prepare(specs, bucket_bytes)
        for bucket, buffer in zip(self._plan, self._buffers, strict=True):
            self._receive_bucket(bucket, buffer)
        self.stats.seconds = time.perf_counter() - start
        return self.stats

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The last update's tensors in announced order, as views of the buffers (after `receive_all`)."""
        for bucket, buffer in zip(self._plan, self._buffers, strict=True):
            yield from _views(bucket, buffer)

    def _prepare(self, specs: Sequence[TensorSpec], bucket_bytes: int) -> None:
        self.stats = TransferStats(tensors=len(specs))
        key = (tuple(specs), bucket_bytes)
        if key != self._plan_key:
            self._buffers = []  # the old plan's memory goes before the new plan's is taken
            self._plan = bucket_plan(specs, bucket_bytes)
            self._buffers = [torch.empty(b.nbytes, dtype=torch.uint8, device=self.group.device) for b in self._plan]
            self._plan_key = key

    def _receive_bucket(self, bucket: Bucket, buffer: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.group.broadcast_(buffer)
        self.stats.broadcast_s += time.perf_counter() - t0
        self.stats.buckets += 1
        self.stats.bytes += bucket.nbytes


def _views(bucket: Bucket, buffer: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every entry of `bucket`, viewed in place in its received `buffer`."""
    for entry in bucket.entries:
        dtype = dtype_from_name(entry.spec.dtype)
        raw = buffer[entry.offset:entry.offset + entry.nbytes]
        tensor = raw.to(torch.bool) if dtype == torch.bool else raw.view(dtype)
        yield entry.spec.name, tensor.view(entry.spec.shape)
