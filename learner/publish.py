"""Weight publishing: after a step, rank 0 broadcasts the full weights to every actor worker.

Protocol (shared with broker and actor): after step v rank 0 sends WeightsAnnounce(version=v,
epoch=0, tensors, bucket_bytes) to the broker and waits for its reply, which carries the epoch and
the weight group's address and size (the learner is rank 0). Rank 0 joins that epoch's group once
and reuses it while the epoch is unchanged, then broadcasts the tensors in `tensors` order, packed
by tether.common.weight_group.bucket_plan. A group of size 1 has no receivers: nothing is sent.
A WeightsAnnounce the broker sends unprompted asks to re-publish the current version to a new
epoch; `serve_republish` answers it between steps.

Memory is bounded: tensors are all-gathered from the FSDP shards one at a time (every learner rank
takes part) and copied into one bucket buffer of at most bucket_bytes, which is sent as soon as it
is full; only rank 0 keeps anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from tether.common.messages import TensorSpec, WeightsAnnounce
from tether.common.weight_group import WeightGroup, bucket_plan, dtype_name, join_weight_group
from tether.learner.model import full_tensor, publish_dtypes


class Rendezvous(Protocol):
    """Rank 0's line to the broker for weight versions."""

    def announce(self, announce: WeightsAnnounce) -> WeightsAnnounce:
        """Announce a version; the reply names the epoch and the group (host, port, world size)."""
        ...

    def poll_republish(self) -> WeightsAnnounce | None:
        """A broker-initiated request to broadcast the current version to a new epoch, if any."""
        ...


@dataclass
class StaticRendezvous:
    """A fixed weight group without a broker (offline runs, tests, benchmarks): its TCPStore is at
    host:port and it always has `world_size` members, the learner being rank 0."""

    host: str
    port: int
    world_size: int
    epoch: int = 0

    def announce(self, announce: WeightsAnnounce) -> WeightsAnnounce:
        return WeightsAnnounce(
            version=announce.version, epoch=self.epoch, tensors=announce.tensors, bucket_bytes=announce.bucket_bytes,
            group_host=self.host, group_port=self.port, group_world_size=self.world_size, first_rank=0,
        )

    def poll_republish(self) -> WeightsAnnounce | None:
        return None


class BrokerRendezvous:
    """Rendezvous through tether.common.peer.BrokerClient (thin adapter; the client owns the socket)."""

    def __init__(self, client):
        self._client = client

    def announce(self, announce: WeightsAnnounce) -> WeightsAnnounce:
        return self._client.announce_weights(announce.version, announce.tensors, announce.bucket_bytes)

    def poll_republish(self) -> WeightsAnnounce | None:
        return self._client.next_weights_announce(timeout=0.0)


@dataclass
class PublishStats:
    version: int
    epoch: int
    receivers: int
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0


class WeightPublisher:
    """Collective over the learner ranks: all gather, rank 0 announces and broadcasts.

    `rendezvous` is used on rank 0 only (None elsewhere).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rank: int,
        bucket_bytes: int,
        body_dtype: torch.dtype,
        fp32_lm_head: bool,
        rendezvous: Rendezvous | None,
        backend: str = "auto",
        device: torch.device | None = None,
        timeout_s: float = 120.0,
    ):
        if rank == 0 and rendezvous is None:
            raise ValueError("rank 0 needs a rendezvous to publish weights")
        self.model = model
        self.rank = rank
        self.bucket_bytes = bucket_bytes
        self.rendezvous = rendezvous
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.timeout_s = timeout_s
        self._dtypes = publish_dtypes(model, body_dtype, fp32_lm_head)  # a tied head matrix once, fp32
        self._group: WeightGroup | None = None

    def specs(self) -> list[TensorSpec]:
        """What is broadcast, in order: every state-dict entry under its Hugging Face name."""
        state = self.model.state_dict()
        return [
            TensorSpec(name=name, shape=tuple(state[name].shape), dtype=dtype_name(dtype))
            for name, dtype in self._dtypes.items()
        ]

    def publish(self, version: int) -> PublishStats:
        """Announce `version` and broadcast it (rank 0); every learner rank must call this."""
        reply = None
        if self.rank == 0:
            reply = self.rendezvous.announce(
                WeightsAnnounce(version=version, epoch=0, tensors=self.specs(), bucket_bytes=self.bucket_bytes)
            )
        return self._broadcast(version, reply)

    def serve_republish(self, version: int) -> PublishStats | None:
        """Answer a broker-initiated re-publish of `version` if one is pending (collective)."""
        request = self.rendezvous.poll_republish() if self.rank == 0 else None
        pending = _broadcast_flag(request is not None)
        if not pending:
            return None
        return self._broadcast(version, request)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _broadcast(self, version: int, reply: WeightsAnnounce | None) -> PublishStats:
        # Rank 0 decides; the others only need to know whether to join the gathers.
        receivers = reply.group_world_size - 1 if reply is not None else 0
        receivers = _broadcast_int(receivers)
        epoch = reply.epoch if reply is not None else -1
        stats = PublishStats(version=version, epoch=epoch, receivers=receivers)
        if receivers <= 0:
            return stats
        start = time.perf_counter()
        group = self._join(reply) if self.rank == 0 else None
        state = self.model.state_dict()
        specs = self.specs()
        for bucket in bucket_plan(specs, self.bucket_bytes):
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device) if group else None
            for entry in bucket.entries:
                name = entry.spec.name
                tensor = full_tensor(state[name])  # collective: every rank gathers
                if buffer is not None:
                    raw = tensor.detach().to(self._dtypes[name]).contiguous().reshape(-1).view(torch.uint8)
                    buffer[entry.offset:entry.offset + entry.nbytes].copy_(raw)
                del tensor
            if group is not None:
                group.broadcast_(buffer)
            stats.buckets += 1
            stats.bytes += bucket.nbytes
        stats.tensors = len(specs)
        stats.seconds = time.perf_counter() - start
        return stats

    def _join(self, reply: WeightsAnnounce) -> WeightGroup:
        if self._group is None or self._group.epoch != reply.epoch:
            self.close()
            self._group = join_weight_group(
                reply.group_host, reply.group_port, reply.epoch, rank=0, world_size=reply.group_world_size,
                backend=self.backend, device=self.device, timeout_s=self.timeout_s,
            )
        return self._group


def _broadcast_int(value: int) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())


def _broadcast_flag(flag: bool) -> bool:
    return bool(_broadcast_int(int(flag)))
