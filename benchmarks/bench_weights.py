"""Weight broadcast benchmark: in-flight update throughput and pause at ~10M and ~100M parameters.

    python -m benchmarks.bench_weights [--quick] [--sizes 10m,100m]

For each size a random Qwen2 (tether.actor.testing) is served by a real ActorEngine; a sender
process (the learner's role) broadcasts a perturbed copy of its weights over a gloo weight group
while 8 requests are generating, through the production path (`ActorEngine.update_weights`:
pause keeping requests, receive, reload, resume; benchmarks.bench_actor._pause). Reported:
the receiver's transfer MB/s against a single-process memcpy of the same bytes (the upper bound of
any copy on this machine; ratio broadcast/memcpy), and the pause per update (time no token can be
generated). Prints a table and writes benchmarks/results/bench_weights-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Shapes chosen for the parameter count (untied head, vocab 257 byte-level tokenizer).
SIZES = {
    "10m": dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12, num_kv_heads=4),
}


def memcpy_mb_per_s(nbytes: int, repeats: int = 3) -> float:
    """Best of `repeats` single-process copies of an `nbytes` buffer (MB/s)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the destination pages is not part of a copy's cost
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / 1e6 / best


def bench_size(name: str, tmp: Path, quick: bool) -> dict:
    """One engine on a random model of `name` size, one in-flight update, one memcpy."""
    import torch

    from benchmarks.bench_actor import bench_model
    from tether.actor.testing import build_random_qwen2, load_state

    model_dir = build_random_qwen2(tmp / name, seed=1, **SIZES[name])
    params = sum(t.numel() for t in load_state(model_dir).values())
    torch.set_num_threads(1)
    update = asyncio.run(bench_model(name, model_dir, tmp, throughput=False, quick=quick))["update"]
    memcpy = memcpy_mb_per_s(update["bytes"])
    return {"size": name, "parameters": int(params), "bytes": update["bytes"],
            "broadcast_mb_per_s": update["transfer_mb_per_s"], "memcpy_mb_per_s": memcpy,
            "broadcast_over_memcpy": update["transfer_mb_per_s"] / memcpy,
            "bare_broadcast_mb_per_s": update["bare_mb_per_s"],
            "pause_s": update["pause_s"], "rpc_s": update["rpc_s"], "update": update}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="10m,100m")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        for name in args.sizes.split(","):
            results.append(bench_size(name.strip(), Path(tmp), args.quick))
    print(f"\n{'size':6} {'params':>10} {'MB':>8} {'bcast MB/s':>10} {'memcpy MB/s':>11} {'ratio':>7} {'pause s':>8}")
    for r in results:
        print(f"{r['size']:6} {r['parameters']:10d} {r['bytes'] / 1e6:8.1f} {r['broadcast_mb_per_s']:10.0f} "
              f"{r['memcpy_mb_per_s']:11.0f} {r['broadcast_over_memcpy']:7.3f} {r['pause_s']:8.3f}")
    out = Path(__file__).resolve().parent / "results" / f"bench_weights-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
