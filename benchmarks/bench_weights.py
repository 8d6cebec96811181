"""Weight path benchmark: the pause of an in-flight update against a bare broadcast of the same bytes.

    python -m benchmarks.bench_weights [--quick] [--models tiny,100m] [--repeats N] [--device cpu]

For each model (the embedded tiny model's shape, and a ~100M-parameter random Qwen2) one run holds:
- a real ActorEngine (vLLM V1 worker with tether's extension) generating a batch of requests,
- a learner process holding the policy and publishing through tether.learner.publish.WeightPublisher
  to a fixed weight group (StaticRendezvous): the production sender,
- a bare two-process torch.distributed broadcast of the same number of bytes (benchmarks.weight_peers),
  run between the updates while the engine is idle: the floor of moving those bytes here.

Each update starts once every request has decoded a few tokens: the learner is told to publish and
`ActorEngine.update_weights` runs at the same moment, as when the broker hands both the WeightUpdate.
Requests keep running in 8 slots throughout; each must run to its length, carry the old version
before the update and the new one after it, and some must span it.
Reported per update: the pause (generation stalled: pause call to resume returned, the engine's
UpdateResult.pause_s) and the longest gap between token outputs the requests saw; the split into
learner gather / learner broadcast / actor join / actor receive / actor load (vLLM's reload) / pause
and resume calls; the bare broadcast; pause / bare. The first update of the epoch joins the group
(reported separately); the others are the steady state (median and spread). Every update is checked
to have landed (a parameter's checksum equals the learner's). Prints a table and writes
benchmarks/results/bench_weights-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tether.common.net import free_port  # noqa: E402  (after the environment vLLM reads)

# ~100M parameters with the byte-level vocabulary (untied fp32 head): 16 layers of width 768.
BIG = dict(hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12, num_kv_heads=4)
BUCKET_BYTES = 64 << 20  # learner.bucket_mb's default
REQUESTS, MAX_TOKENS, TOKENS_BEFORE_UPDATE = 8, 32, 16


def build_model(name: str, out: Path) -> Path:
    """The model directory of `name`: tiny (the embedded model's shape, not warm-started) or 100m."""
    if name == "tiny":
        from tether.common.tiny_model import build_tiny_model

        build_tiny_model(out, seed=0, warm_start=False)
        return out
    if name == "100m":
        from tether.actor.testing import build_random_qwen2

        return build_random_qwen2(out, seed=1, **BIG)
    raise ValueError(f"unknown model {name!r} (tiny or 100m)")


class Traffic:
    """Requests kept generating in `n` slots (each starts a new request when its last one ends),
    recording when every output arrives (the requests' clock) and each request's versions."""

    def __init__(self, engine, n: int, max_tokens: int, tag: str):
        self.engine, self.max_tokens, self.tag = engine, max_tokens, tag
        self.arrivals: list[float] = []
        self.arrived_tokens: list[int] = []
        self.requests: list[dict] = []
        self.tokens = 0
        self._launching = True
        self.tasks = [asyncio.ensure_future(self._slot(i)) for i in range(n)]

    async def _slot(self, slot: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        k = 0
        while self._launching:
            k += 1
            params = SamplingParams(max_tokens=self.max_tokens, logprobs=0, seed=slot * 1000 + k, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            record = {"start": time.perf_counter(), "end": None, "versions": None, "finish": None}
            async for output in self.engine.stream([5 + slot, 9, 17], params, f"{self.tag}-{slot}-{k}"):
                self.arrivals.append(time.perf_counter())
                self.arrived_tokens.append(len(output.outputs[0].token_ids))
                self.tokens += len(output.outputs[0].token_ids)
                if output.finished:
                    record["end"] = time.perf_counter()
                    record["finish"] = output.outputs[0].finish_reason
                    record["versions"] = [int(s.version) for s in output.outputs[0].weight_versions]
            self.requests.append(record)

    async def decoded(self, tokens: int) -> None:
        """Until `tokens` more tokens per slot have arrived."""
        target = self.tokens + tokens * len(self.tasks)
        while self.tokens < target:
            if any(task.done() for task in self.tasks):
                await asyncio.gather(*self.tasks)  # raises a request's error
            await asyncio.sleep(0.002)

    async def finish(self) -> None:
        """Start no new request; wait for the running ones."""
        self._launching = False
        await asyncio.gather(*self.tasks)

    def check_versions(self, old: int, new: int, start: float, end: float) -> int:
        """Every request ran to its length, versions never go back, requests running before the
        update began on `old`, requests running after it ended on `new`. Returns how many spanned it
        (none when the receive outlasted every running request: the update then landed between
        requests, which the row records)."""
        spanned = 0
        for r in self.requests:
            v = r["versions"]
            if r["finish"] != "length" or v != sorted(v) or not set(v) <= {old, new}:
                raise RuntimeError(f"request {r} was cut short or mixes versions other than {old} -> {new}")
            if (r["start"] < start and v[0] != old) or (r["end"] > end and v[-1] != new):
                raise RuntimeError(f"request {r} carries the wrong version around the update at {start}-{end}")
            spanned += v[0] == old and v[-1] == new
        return spanned

    def longest_gap(self, start: float, end: float) -> float:
        """Longest time without any token output that overlaps [start, end]."""
        times = sorted(self.arrivals)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= start and a <= end]
        return max(gaps, default=0.0)

    def step_s(self, start: float) -> float:
        """Median time between outputs before `start` (one decode step of the batch)."""
        times = sorted(t for t in self.arrivals if t < start)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b - a > 1e-4]
        return statistics.median(gaps) if gaps else 0.0

    def tokens_per_s(self, start: float, end: float) -> float:
        """Tokens per second that arrived in [start, end]."""
        n = sum(k for t, k in zip(self.arrivals, self.arrived_tokens, strict=True) if start <= t <= end)
        return n / (end - start) if end > start else 0.0


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


async def _recv(conn, timeout: float = 600.0):
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError("a benchmark peer did not answer")
    return conn.recv()


async def bench_model(name: str, model_dir: Path, repeats: int, device: str) -> dict:
    """One engine, one learner, one bare pair; `repeats` steady-state updates after the epoch's first."""
    import msgspec
    from torch.distributed import TCPStore

    from benchmarks.weight_peers import bare_main, learner_main
    from tether.actor.engine import ActorEngine
    from tether.actor.testing import load_state
    from tether.common.config import EngineConfig, ModelConfig
    from tether.common.weight_group import spec_nbytes
    from tether.learner.publish import StaticRendezvous

    params = sum(t.numel() for t in load_state(model_dir).values())
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the broker's store
    learner, learner_conn = _spawn(learner_main, str(model_dir), "127.0.0.1", port, BUCKET_BYTES, device)
    specs = await _recv(learner_conn)
    nbytes = sum(spec_nbytes(s) for s in specs)
    init = f"tcp://127.0.0.1:{free_port()}"
    bare = [_spawn(bare_main, init, rank, nbytes, device) for rank in (0, 1)]
    for _, conn in bare:
        assert await _recv(conn) == "ready"
    engine = await ActorEngine.start(EngineConfig(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=256),
                                     ModelConfig(dtype="float32"), str(model_dir), device=device)
    rendezvous = StaticRendezvous("127.0.0.1", port, world_size=2, group_key="weights/bench")
    rows = []
    try:
        for i in range(repeats + 1):
            version = engine.version + 1
            # The actor's copy of the learner's WeightUpdate: same group, its rank after the learner's.
            update = msgspec.structs.replace(rendezvous.publish(version, specs, BUCKET_BYTES), first_rank=1)
            learner_conn.send(("prepare",))
            await _recv(learner_conn)
            traffic = Traffic(engine, REQUESTS, MAX_TOKENS, f"v{version}")
            await traffic.decoded(TOKENS_BEFORE_UPDATE)
            start = time.perf_counter()
            learner_conn.send(("publish", version))
            result = await engine.update_weights(update)
            end = time.perf_counter()
            await traffic.finish()
            spanning = traffic.check_versions(version - 1, version, start, end)
            published = await _recv(learner_conn)
            landed = (await engine.llm.collective_rpc("tether_param_checksum", args=("model.norm.weight",)))[0]
            if not published["ok"] or abs(landed - published["norm_checksum"]) > 1e-6 * abs(landed):
                raise RuntimeError(f"update {version} did not land: {published}, checksum {landed}")
            for _, conn in bare:
                conn.send(("broadcast",))
            bare_s = max([await _recv(conn) for _, conn in bare])
            rows.append(_row(result, published, traffic, start, end, bare_s, first=i == 0) | {"requests_spanning": spanning})
    finally:
        engine.shutdown()
        learner_conn.send(("stop",))
        for _, conn in bare:
            conn.send(("stop",))
        for proc in [learner] + [p for p, _ in bare]:
            proc.join(30)
        del store
    steady = rows[1:]
    return {"model": name, "parameters": int(params), "bytes": nbytes, "device": device,
            "bucket_bytes": BUCKET_BYTES, "requests": REQUESTS, "first_update": rows[0], "updates": steady,
            "median": {key: statistics.median(r[key] for r in steady) for key in steady[0]},
            "spread": {key: [min(r[key] for r in steady), max(r[key] for r in steady)] for key in steady[0]}}


def _row(result, published: dict, traffic: Traffic, start: float, end: float, bare_s: float, first: bool) -> dict:
    """One update's numbers; every actor-side figure is the slowest worker's."""
    workers = result.workers

    def worst(key: str) -> float:
        return max(float(w.get(key, 0.0)) for w in workers)

    gap, step = traffic.longest_gap(start, end), traffic.step_s(start)
    paused_at = start + getattr(result, "ready_s", 0.0)
    return {
        "last_token_to_pause_s": paused_at - max((t for t in traffic.arrivals if t <= paused_at), default=paused_at),
        "resume_to_token_s": min((t for t in traffic.arrivals if t >= end), default=end) - end,
        "pause_s": result.pause_s,
        "token_gap_s": gap,
        "step_s": step,
        "stall_s": gap - step,
        "tokens_per_s_before": traffic.tokens_per_s(traffic.arrivals[REQUESTS], start),
        "tokens_per_s_ready": traffic.tokens_per_s(start, start + getattr(result, "ready_s", 0.0)),
        "update_s": end - start,
        "learner_join_s": published["join_s"],
        "learner_gather_s": published["gather_s"],
        "learner_broadcast_s": published["broadcast_s"],
        "learner_s": published["seconds"],
        "ready_s": getattr(result, "ready_s", 0.0),  # 0 where the receive ran inside the pause
        "actor_join_s": worst("join_s"),
        "actor_receive_s": worst("receive_s"),
        "actor_stage_s": worst("stage_s"),
        "actor_load_s": worst("load_s"),
        "pause_call_s": result.pause_call_s,
        "resume_s": result.resume_s,
        "rpc_s": result.rpc_s,
        "bare_broadcast_s": bare_s,
        "pause_over_bare": result.pause_s / bare_s,
        "first": float(first),
    }


COLUMNS = [("pause_s", "pause"), ("stall_s", "stall"), ("step_s", "step"), ("ready_s", "ready"),
           ("learner_gather_s", "L gather"), ("learner_broadcast_s", "L bcast"), ("actor_join_s", "A join"),
           ("actor_receive_s", "A recv"), ("actor_stage_s", "A stage"), ("actor_load_s", "A load"),
           ("pause_call_s", "pause()"), ("resume_s", "resume()"),
           ("bare_broadcast_s", "bare"), ("pause_over_bare", "pause/bare")]


def format_table(results: list[dict]) -> str:
    head = f"{'model':6} {'params':>7} {'MB':>6} {'':6} " + " ".join(f"{label:>10}" for _, label in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in results:
        lead = f"{r['model']:6} {r['parameters'] / 1e6:6.1f}M {r['bytes'] / 1e6:6.1f}"
        lines.append(f"{lead} {'median':6} " + " ".join(f"{r['median'][k]:10.4f}" for k, _ in COLUMNS))
        lines.append(f"{'':21} {'min':6} " + " ".join(f"{r['spread'][k][0]:10.4f}" for k, _ in COLUMNS))
        lines.append(f"{'':21} {'max':6} " + " ".join(f"{r['spread'][k][1]:10.4f}" for k, _ in COLUMNS))
        lines.append(f"{'':21} {'first':6} " + " ".join(f"{r['first_update'][k]:10.4f}" for k, _ in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer updates per model")
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--repeats", type=int, default=0, help="steady-state updates per model (default 7, quick 3)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    results = []
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            model_dir = build_model(name, Path(tmp) / name)
            results.append({**asyncio.run(bench_model(name, model_dir, repeats, args.device)), "commit": commit})
            print(format_table(results[-1:]), flush=True)
    print()
    print(format_table(results))
    out = Path(__file__).resolve().parent / "results" / f"bench_weights-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
