"""The bucketed weight broadcast: real gloo groups over a TCPStore standing in for the broker's."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from tether.common.messages import TensorSpec
from tether.common.net import free_port
from tether.common.weight_group import (
    ALIGN,
    WeightReceiver,
    WeightSender,
    bucket_plan,
    join_weight_group,
    spec_nbytes,
    tensor_specs,
)


def _named_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    """fp32, bf16 and an int tensor with odd sizes, so alignment and bucketing are exercised."""
    gen = torch.Generator().manual_seed(seed)
    return [
        ("embed.weight", torch.randn(37, 16, generator=gen)),
        ("layer.0.bias", torch.randn(13, generator=gen).to(torch.bfloat16)),
        ("layer.0.weight", torch.randn(64, 33, generator=gen).to(torch.bfloat16)),
        ("norm.weight", torch.randn(7, generator=gen)),
        ("big", torch.randn(3000, generator=gen)),  # 12 kB: larger than a bucket, travels alone
        ("counts", torch.arange(5, dtype=torch.int64)),
        ("lm_head.weight", torch.randn(11, 16, generator=gen) * 1e-30),  # subnormal-ish values
    ]


def _sender_main(port: int, epoch: int, world_size: int, bucket_bytes: int, seed: int) -> None:
    torch.set_num_threads(1)
    with join_weight_group("127.0.0.1", port, f"weights/test/{epoch}", 0, world_size, backend="gloo", timeout_s=60) as group:
        WeightSender(group, bucket_bytes).broadcast(_named_tensors(seed))


def test_bucket_plan_respects_limit_order_and_alignment():
    specs = tensor_specs(_named_tensors(0))
    plan = bucket_plan(specs, bucket_bytes=4096)
    flat = [entry.spec for bucket in plan for entry in bucket.entries]
    assert flat == specs
    for bucket in plan:
        assert bucket.nbytes <= 4096 or len(bucket.entries) == 1
        for entry in bucket.entries:
            assert entry.offset % ALIGN == 0
            assert entry.nbytes == spec_nbytes(entry.spec)
        ends = [e.offset + e.nbytes for e in bucket.entries]
        assert all(end <= nxt.offset for end, nxt in zip(ends, bucket.entries[1:], strict=False))
        assert bucket.nbytes == ends[-1]
    assert len(plan) >= 3
    oversized = [[e.spec.name for e in b.entries] for b in plan if b.nbytes > 4096]
    assert oversized == [["layer.0.weight"], ["big"]]
    assert len(bucket_plan(specs, 1 << 30)) == 1
    with pytest.raises(ValueError):
        bucket_plan(specs, 0)
    with pytest.raises(ValueError):
        bucket_plan([TensorSpec(name="x", shape=(2,), dtype="complex7")], 16)


@pytest.mark.slow
@pytest.mark.parametrize("bucket_bytes", [4096, 1 << 20])
def test_broadcast_is_bit_identical_between_processes(bucket_bytes):
    port = free_port()
    # The broker's store: master in this process, the participants connect as clients.
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    epoch, seed = 3, 7
    sender = mp.get_context("spawn").Process(target=_sender_main, args=(port, epoch, 2, bucket_bytes, seed))
    sender.start()
    try:
        expected = _named_tensors(seed)
        specs = tensor_specs(expected)
        with join_weight_group("127.0.0.1", port, f"weights/test/{epoch}", 1, 2, backend="gloo", timeout_s=60) as group:
            receiver = WeightReceiver(group)
            received = list(receiver.receive(specs, bucket_bytes))
        assert [name for name, _ in received] == [name for name, _ in expected]
        for (name, got), (_, want) in zip(received, expected, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            # Compare the bits, not the values: bf16 and fp32 must arrive exactly.
            assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), name
        assert receiver.stats.buckets == len(bucket_plan(specs, bucket_bytes))
        assert receiver.stats.buckets > 1 if bucket_bytes == 4096 else receiver.stats.buckets == 1
    finally:
        sender.join(timeout=60)
        del master
    assert sender.exitcode == 0


@pytest.mark.slow
def test_missing_sender_times_out_instead_of_hanging():
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    with pytest.raises(Exception):  # noqa: B017 - gloo raises RuntimeError/DistStoreError by version
        join_weight_group("127.0.0.1", port, "weights/alone", 1, 2, backend="gloo", timeout_s=2)
    del master


def test_rank_checks():
    with pytest.raises(ValueError):
        join_weight_group("127.0.0.1", 1, "weights/x", 2, 2, backend="gloo")
