"""The two other processes of benchmarks.bench_weights: the learner's publisher and a bare broadcast pair.

Each runs in its own spawned process and takes commands over a multiprocessing pipe, so the
benchmark can interleave production updates and bare broadcasts in one run:

- `learner_main`: holds the policy as the learner does (tether.learner.model.load_policy, one
  unsharded rank) and publishes through tether.learner.publish.WeightPublisher to the fixed group a
  StaticRendezvous names: the production sender, not a stand-in.
- `bare_main`: one of two ranks of a plain torch.distributed gloo group (init_process_group,
  dist.broadcast of one preallocated uint8 buffer): the floor of moving the same bytes between two
  processes on this machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict


def learner_main(conn, model_dir: str, host: str, port: int, bucket_bytes: int, device: str) -> None:
    """On command: ("prepare",) changes the weights (-> a checksum), ("publish", version) publishes them
    (-> PublishStats as a dict), ("stop",) ends."""
    import torch

    from tether.learner.model import load_policy
    from tether.learner.publish import StaticRendezvous, WeightPublisher

    torch.set_num_threads(1)  # learner.num_threads' default on CPU
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model = load_policy(model_dir, dev, torch.float32, fp32_lm_head=True, shard=False, trainable=False)
    publisher = WeightPublisher(model, rank=0, bucket_bytes=bucket_bytes, body_dtype=torch.float32,
                                fp32_lm_head=True, backend="auto", device=dev, timeout_s=120.0)
    rendezvous = StaticRendezvous(host, port, world_size=2, group_key="weights/bench")
    specs = publisher.specs()
    conn.send(specs)
    generator = torch.Generator(device=dev).manual_seed(0)
    norm = 0.0
    try:
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "prepare":  # new weights, as after an optimizer step (not timed)
                with torch.no_grad():
                    for param in model.parameters():
                        param.mul_(1 + 1e-3 * torch.randn(param.shape, generator=generator, device=dev))
                    norm = model.state_dict()["model.norm.weight"].double().sum().item()
                conn.send(norm)
                continue
            version = command[1]
            stats = publisher.broadcast(version, rendezvous.publish(version, specs, bucket_bytes))
            conn.send({**asdict(stats), "norm_checksum": norm})
    finally:
        publisher.close()


def bare_main(conn, init_method: str, rank: int, nbytes: int, device: str) -> None:
    """Broadcast one `nbytes` buffer from rank 0 on each ("broadcast",); send back the seconds."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=2)
    buffer = torch.full((nbytes,), rank, dtype=torch.uint8, device=dev)  # pages touched before timing
    dist.broadcast(torch.zeros(1, dtype=torch.uint8, device=dev), 0)  # connections made
    conn.send("ready")
    try:
        while conn.recv()[0] != "stop":
            dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)  # both ranks start together
            start = time.perf_counter()
            dist.broadcast(buffer, 0)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            conn.send(time.perf_counter() - start)
    finally:
        dist.destroy_process_group()
