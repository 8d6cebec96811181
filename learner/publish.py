"""Weight publishing: learner rank 0 broadcasts the full weights to every actor worker.

Protocol (shared with broker and actor; docs/wire-protocol.md, "Weight updates"): rank 0 offers its
current version to the broker (PublishRequest) and gets back either a WeightUpdate, naming the
epoch's weight group (address, rendezvous key, world size; the learner is rank 0), or a deferral.
Rank 0 joins that group once per epoch and keeps it while the epoch lasts, then broadcasts the
tensors in `specs()` order, packed by tether.common.weight_group.bucket_plan, and reports the
outcome (UpdateReport). The `Rendezvous` is rank 0's line to the broker (learner/broker_link.py
implements it); `StaticRendezvous` is a fixed group without a broker.

Memory is bounded: tensors are all-gathered from the FSDP shards one at a time (every learner rank
takes part) and copied into bucket buffers of at most bucket_bytes, allocated once per epoch; only
rank 0 keeps anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from tether.common.logging import get_logger
from tether.common.messages import TensorSpec, WeightUpdate
from tether.common.weight_group import (
    WeightGroup,
    WeightSender,
    WeightTransferError,
    bucket_plan,
    dtype_name,
    join_weight_group,
    spec_nbytes,
)
from tether.learner.model import full_tensor, publish_dtypes

log = get_logger(__name__)


class Rendezvous(Protocol):
    """Rank 0's line to the broker for weight versions and commits."""

    def publish(self, version: int, tensors: list[TensorSpec], bucket_bytes: int) -> WeightUpdate | None:
        """Offer `version`; the WeightUpdate to broadcast now, or None when there is nothing to send."""
        ...

    def publish_wanted(self) -> bool:
        """Whether the broker asked for a publish since the last `publish()`."""
        ...

    def actors_hold(self, version: int) -> bool:
        """Whether every live actor holds `version` and no weight update is running."""
        ...

    def report_update(self, update: WeightUpdate, *, ok: bool, seconds: float, error: str = "") -> None:
        ...

    def commit(self, version: int) -> None:
        """The checkpoint at `version` is complete."""
        ...


@dataclass
class StaticRendezvous:
    """A fixed weight group without a broker (offline runs, tests, benchmarks): its TCPStore is at
    host:port and it always has `world_size` members, the learner being rank 0."""

    host: str
    port: int
    world_size: int
    epoch: int = 0
    group_key: str = "weights/static"

    def publish(self, version: int, tensors: list[TensorSpec], bucket_bytes: int) -> WeightUpdate | None:
        if self.world_size <= 1:
            return None
        return WeightUpdate(version=version, lineage="static", epoch=self.epoch, group_key=self.group_key,
                            group_host=self.host, group_port=self.port, world_size=self.world_size, first_rank=0,
                            tensors=tensors, bucket_bytes=bucket_bytes)

    def publish_wanted(self) -> bool:
        return False

    def actors_hold(self, version: int) -> bool:
        return True  # a static group receives every publish in full, or fails it

    def report_update(self, update: WeightUpdate, *, ok: bool, seconds: float, error: str = "") -> None:
        if not ok:
            log.warning("static weight group broadcast failed", version=update.version, error=error)

    def commit(self, version: int) -> None:
        pass


@dataclass
class PublishStats:
    version: int
    epoch: int
    receivers: int
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    join_s: float = 0.0
    """Rank 0: joining the epoch's weight group (once per epoch; 0 while the group is kept)."""
    gather_s: float = 0.0
    """Rank 0: time in the all-gathers and the copies into the bucket buffers."""
    broadcast_s: float = 0.0
    """Rank 0: time in the weight-group broadcasts (waiting for slower members included)."""
    ok: bool = True
    error: str = ""


class WeightPublisher:
    """Collective over the learner ranks: all gather, rank 0 broadcasts to the weight group."""

    def __init__(
        self,
        model: nn.Module,
        *,
        rank: int,
        bucket_bytes: int,
        body_dtype: torch.dtype,
        fp32_lm_head: bool,
        backend: str = "auto",
        device: torch.device | None = None,
        timeout_s: float = 120.0,
    ):
        self.model = model
        self.rank = rank
        self.bucket_bytes = bucket_bytes
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.timeout_s = timeout_s
        self._dtypes = publish_dtypes(model, body_dtype, fp32_lm_head)  # a tied head matrix once, fp32
        state = model.state_dict()
        self._specs = [
            TensorSpec(name=name, shape=tuple(state[name].shape), dtype=dtype_name(dtype))
            for name, dtype in self._dtypes.items()
        ]
        self._group: WeightGroup | None = None
        self._sender: WeightSender | None = None

    def specs(self) -> list[TensorSpec]:
        """What is broadcast, in order: every state-dict entry under its Hugging Face name."""
        return list(self._specs)

    def broadcast(self, version: int, update: WeightUpdate | None) -> PublishStats:
        """Send `version` to the group `update` names (rank 0; None elsewhere). Every rank calls it.

        Never raises for a group failure: rank 0 returns ok=False with the error (and drops the
        group), after taking part in every gather so the learner ranks stay in lockstep.
        """
        receivers = broadcast_int(update.world_size - 1 if update is not None else 0, self.device)
        stats = PublishStats(version=version, epoch=update.epoch if update is not None else -1, receivers=receivers)
        if receivers <= 0:
            return stats
        start = time.perf_counter()
        group = None
        if self.rank == 0:
            try:
                group = self._join(update)
            except Exception as exc:  # a dead or stuck member: this epoch is over
                stats.ok, stats.error = False, f"joining the weight group failed: {exc}"
                self.close()
            stats.join_s = time.perf_counter() - start
        if not broadcast_int(int(group is not None), self.device):
            stats.ok = False
            stats.seconds = time.perf_counter() - start
            return stats
        state = self.model.state_dict()
        if group is None:
            for spec in self._specs:
                full_tensor(state[spec.name])  # collective: every rank gathers
        else:
            assert self._sender is not None
            try:
                transfer = self._sender.send(self._specs, lambda spec: full_tensor(state[spec.name]))
                stats.gather_s, stats.broadcast_s = transfer.fill_s, transfer.broadcast_s
            except WeightTransferError as exc:
                stats.ok, stats.error = False, str(exc)
                self.close()
        stats.buckets = len(bucket_plan(self._specs, self.bucket_bytes))
        stats.bytes = sum(spec_nbytes(spec) for spec in self._specs)
        stats.tensors = len(self._specs)
        stats.seconds = time.perf_counter() - start
        return stats

    def close(self) -> None:
        if self._group is not None:
            self._group.abort()
        self._group, self._sender = None, None

    def _join(self, update: WeightUpdate) -> WeightGroup:
        if self._group is None or self._group.key != update.group_key:
            self.close()
            self._group = join_weight_group(
                update.group_host, update.group_port, update.group_key, rank=0, world_size=update.world_size,
                backend=self.backend, device=self.device, timeout_s=self.timeout_s,
            )
            self._sender = WeightSender(self._group, self.bucket_bytes)  # its buffers live as long as the epoch
        return self._group


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's `value` on every learner rank (a no-op on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_collective_device(device))
    dist.broadcast(tensor, 0)
    return int(tensor.item())


def broadcast_flags(any_flag: bool, rank0_flag: bool, device: torch.device) -> tuple[bool, bool]:
    """(whether `any_flag` holds on some rank, rank 0's `rank0_flag`), agreed by every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return any_flag, rank0_flag
    values = torch.tensor([int(any_flag), int(rank0_flag) if dist.get_rank() == 0 else 0], dtype=torch.long,
                          device=_collective_device(device))
    dist.all_reduce(values)
    return bool(values[0]), bool(values[1])


def _collective_device(device: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
