"""Broker benchmark: sustained rollouts/s and ack latency with 64 simulated actors, plus wire codec speed.

    python -m benchmarks.bench_broker [--actors 64] [--seconds 10] [--tokens 1000] [--procs 2]

A real broker daemon runs as a subprocess on loopback. The actors are BrokerClients (DEALER sockets)
multiplexed over `--procs` processes, call-driven from one thread each; every actor keeps up to
`--window` rollouts in flight. A learner in this process drains whole batches so the buffer never
fills. Latency is first send to ack, measured in the actor. Prints a table and writes JSON to
benchmarks/results/bench_broker-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import Rollout, SamplingSpec, float32_array, int32_array
from tether.common.net import free_port
from tether.common.peer import Backpressure, BrokerClient, BrokerError

RESULTS = Path(__file__).resolve().parent / "results"


def make_rollout(rid: str, tokens: int, actor: str) -> Rollout:
    return Rollout(
        rollout_id=rid, group_id=rid, group_size=1, actor_id=actor, task="bench",
        prompt_token_ids=int32_array(np.arange(64) % 250),
        completion_token_ids=int32_array(np.arange(tokens) % 250),
        logprobs=float32_array(np.full(tokens, -0.7)),
        versions=int32_array(np.zeros(tokens)),
        reward=0.5, sampling=SamplingSpec(temperature=1.0, max_tokens=tokens), finish_reason="length",
    )


def bench_wire(tokens: int, n: int = 3000) -> dict:
    r = make_rollout("wire", tokens, "a")
    data = wire.encode(r, sender="a")
    t0 = time.perf_counter()
    for _ in range(n):
        wire.encode(r, sender="a")
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        wire.decode(data)
    dec = time.perf_counter() - t0
    return {"message_bytes": len(data), "encode_per_s": n / enc, "decode_per_s": n / dec,
            "encode_mb_s": n * len(data) / enc / 1e6, "decode_mb_s": n * len(data) / dec / 1e6}


def _actor_proc(port: int, ids: list[str], seconds: float, tokens: int, window: int, out: mp.Queue) -> None:
    cfg = BrokerConfig(port=port, host_store=False)
    clients = [BrokerClient.from_config(cfg, peer_id=i, role="actor", heartbeat_interval_s=1.0,
                                        resend_interval_s=5.0, max_unacked=window) for i in ids]
    for c in clients:
        c.ack_latencies = []
        c.hello(loaded_version=0, timeout=30)
    payloads = {c.peer_id: make_rollout("x", tokens, c.peer_id) for c in clients}
    seq = 0
    t_end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < t_end:
        for c in clients:
            if c.unacked_count < window:
                base = payloads[c.peer_id]
                # Only the ids differ: re-encoding the arrays is the realistic cost, so keep it.
                seq += 1
                r = msgspec_replace(base, f"{c.peer_id}-{seq}")
                try:
                    c.send_rollouts([r])
                    sent += 1
                except Backpressure:
                    pass
            else:
                c.poll(0)
    for c in clients:
        c.flush(timeout=10)
    lat = [x for c in clients for x in c.ack_latencies]
    for c in clients:
        c.close()
    out.put({"sent": sent, "latencies": lat})


def msgspec_replace(r: Rollout, rid: str) -> Rollout:
    import msgspec

    return msgspec.structs.replace(r, rollout_id=rid, group_id=rid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=64)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--window", type=int, default=4, help="rollouts in flight per actor")
    args = parser.parse_args(argv)

    wire_stats = bench_wire(args.tokens)
    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="bench-broker-")
    broker = subprocess.Popen(
        [sys.executable, "-m", "tether.broker", f"broker.port={port}", "broker.host_store=false",
         "broker.buffer_capacity=100000", f"run.dir={run_dir}", "run.log_level=warning",
         "learner.rollouts_per_step=64"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        cfg = BrokerConfig(port=port, host_store=False)
        learner = BrokerClient.from_config(cfg, peer_id="learner-0", role="learner")
        deadline = time.monotonic() + 60
        while True:
            try:
                learner.hello(timeout=1.0)
                break
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
        consumed = [0]
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                batch = learner.request_batch(rank=0, size=64, learner_version=0, max_lag=1000, timeout=0.5)
                if batch is not None:
                    consumed[0] += len(batch.rollouts)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        ids = [f"actor-{i}" for i in range(args.actors)]
        shards = [ids[i :: args.procs] for i in range(args.procs)]
        procs = [ctx.Process(target=_actor_proc, args=(port, shard, args.seconds, args.tokens, args.window, out))
                 for shard in shards]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        results = [out.get(timeout=args.seconds + 120) for _ in procs]
        elapsed = time.monotonic() - t0
        for p in procs:
            p.join(10)
        stop.set()
        drainer.join(5)
        learner.close()
    finally:
        broker.terminate()
        broker.wait(10)

    lat = np.array([x for r in results for x in r["latencies"]])
    acked = len(lat)
    # Start-up (spawn + hello) is inside `elapsed`; the steady-state rate uses the send window.
    rate = acked / args.seconds
    row = {
        "actors": args.actors, "procs": args.procs, "tokens": args.tokens, "window": args.window,
        "seconds": args.seconds, "acked": acked, "rollouts_per_s": rate,
        "ack_p50_ms": float(np.percentile(lat, 50) * 1e3) if acked else None,
        "ack_p99_ms": float(np.percentile(lat, 99) * 1e3) if acked else None,
        "tokens_per_s": rate * args.tokens, "elapsed_s": elapsed,
        "wire": wire_stats, "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"{'metric':<34} {'value':>14}")
    print(f"{'actors x window':<34} {args.actors:>10} x {args.window}")
    print(f"{'rollouts acked':<34} {acked:>14}")
    print(f"{'sustained rollouts/s':<34} {rate:>14.1f}")
    print(f"{'completion tokens/s':<34} {rate * args.tokens:>14.0f}")
    if acked:
        print(f"{'ack latency p50 (ms)':<34} {row['ack_p50_ms']:>14.2f}")
        print(f"{'ack latency p99 (ms)':<34} {row['ack_p99_ms']:>14.2f}")
    print(f"{'wire message bytes':<34} {wire_stats['message_bytes']:>14}")
    print(f"{'wire encode msgs/s':<34} {wire_stats['encode_per_s']:>14.0f}")
    print(f"{'wire decode+validate msgs/s':<34} {wire_stats['decode_per_s']:>14.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_broker-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(row, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
