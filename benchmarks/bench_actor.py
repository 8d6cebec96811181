"""Actor benchmark: throughput against bare vLLM, and in-flight update pause against a bare broadcast.

    python -m benchmarks.bench_actor [--quick]

1. tokens/s: the same AsyncLLM, same settings and prompts, driven bare (llm.generate) and through
   ActorEngine.generate (version spans, logprob extraction); alternating trials; ratio actor/bare.
2. pause: for the tiny test model and a ~100M-parameter random model, an update mid-generation
   (pause -> gloo receive -> reload -> resume) against a bare two-process torch.distributed
   broadcast of the same bytes; ratio pause/bare.
Prints a table and writes benchmarks/results/bench_actor-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from tether.common.net import free_port

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _bare_peer(port: int, rank: int, nbytes: int, out) -> None:
    import torch

    from tether.common.weight_group import join_weight_group

    with join_weight_group("127.0.0.1", port, "weights/bare", rank, 2, backend="gloo", timeout_s=120) as group:
        buffer = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
        group.broadcast_(torch.zeros(1, dtype=torch.uint8))  # both joined: time only the data
        start = time.perf_counter()
        group.broadcast_(buffer)
        out.put((rank, time.perf_counter() - start))


def bare_broadcast_s(nbytes: int) -> float:
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_bare_peer, args=(port, r, nbytes, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    times = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    del store
    return times[1]


async def _throughput(engine, prompts, max_tokens: int, trials: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    def params(seed):
        p = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens, logprobs=0, seed=seed, ignore_eos=True)
        p.output_kind = RequestOutputKind.FINAL_ONLY
        return p

    async def bare_one(i, prompt, trial):
        final = None
        async for final in engine.llm.generate(TokensPrompt(prompt_token_ids=prompt), params(i), f"bare-{trial}-{i}"):  # noqa: B007
            pass
        return len(final.outputs[0].token_ids)

    async def actor_one(i, prompt, trial):
        return len((await engine.generate(prompt, params(i), f"act-{trial}-{i}")).token_ids)

    rates = {"bare": [], "actor": []}
    await asyncio.gather(*[bare_one(i, p, -1) for i, p in enumerate(prompts)])  # warm-up (first logprobs request)
    for trial in range(trials):
        for name, fn in (("bare", bare_one), ("actor", actor_one)) if trial % 2 == 0 else (("actor", actor_one), ("bare", bare_one)):
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*[fn(i, p, trial) for i, p in enumerate(prompts)]))
            rates[name].append(tokens / (time.perf_counter() - start))
    bare, actor = sorted(rates["bare"])[len(rates["bare"]) // 2], sorted(rates["actor"])[len(rates["actor"]) // 2]
    return {"bare_tokens_per_s": bare, "actor_tokens_per_s": actor, "ratio": actor / bare, "trials": rates}


async def _pause(engine, model_dir: Path, tmp: Path, epoch: int, version: int) -> dict:
    import torch
    from torch.distributed import TCPStore
    from vllm import SamplingParams

    from tether.actor.testing import load_state, local_update, perturbed_state, send_states

    state = perturbed_state(load_state(model_dir), 0.05, seed=epoch)
    path = tmp / f"state-{epoch}.pt"
    torch.save(state, path)
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    bucket = 32 << 20
    announce = local_update(version, epoch, state, bucket, port)
    # Sender process started and joined-waiting before the pause, as a learner would be.
    sender = mp.get_context("spawn").Process(target=send_states, args=(port, [(epoch, str(path))], bucket))
    sender.start()
    await asyncio.sleep(4.0)
    gen = [asyncio.ensure_future(engine.generate([5 + i, 9, 17], SamplingParams(max_tokens=48, logprobs=0, seed=i,
                                                                              ignore_eos=True))) for i in range(8)]
    await asyncio.sleep(0.3)
    result = await engine.update_weights(announce)
    await asyncio.gather(*gen)
    sender.join(120)
    del store
    nbytes = sum(int(t.numel()) * t.element_size() for t in state.values())
    bare = bare_broadcast_s(nbytes)
    return {"bytes": nbytes, "pause_s": result.pause_s, "rpc_s": result.rpc_s, "transfer_s": result.transfer_s,
            "transfer_mb_per_s": result.mb_per_s, "bare_broadcast_s": bare,
            "bare_mb_per_s": nbytes / 1e6 / bare, "pause_over_bare": result.pause_s / bare}


async def bench_model(name: str, model_dir: Path, tmp: Path, throughput: bool, quick: bool) -> dict:
    from tether.actor.engine import ActorEngine
    from tether.common.config import EngineConfig, ModelConfig

    engine = await ActorEngine.start(EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=256),
                                     ModelConfig(dtype="float32"), str(model_dir))
    try:
        out = {"model": name}
        if throughput:
            prompts = [[(3 * i + j) % 250 + 3 for j in range(8)] for i in range(32 if quick else 64)]
            out["throughput"] = await _throughput(engine, prompts, 32 if quick else 64, 3 if quick else 5)
        out["update"] = await _pause(engine, model_dir, tmp, epoch=1, version=1)
        return out
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-100m", action="store_true")
    args = parser.parse_args()
    from tether.actor.testing import build_random_qwen2

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_random_qwen2(tmp / "tiny", seed=0)
        results.append(asyncio.run(bench_model("tiny (random, ~0.5M)", tiny, tmp, True, args.quick)))
        if not args.skip_100m:
            big = build_random_qwen2(tmp / "big", hidden_size=768, intermediate_size=2048, num_layers=16,
                                     num_heads=12, num_kv_heads=4, seed=1)
            results.append(asyncio.run(bench_model("random ~100M", big, tmp, False, args.quick)))
    print(f"\n{'model':24} {'metric':28} {'value':>12}")
    for r in results:
        if "throughput" in r:
            t = r["throughput"]
            print(f"{r['model']:24} {'bare vLLM tokens/s':28} {t['bare_tokens_per_s']:12.0f}")
            print(f"{r['model']:24} {'actor tokens/s':28} {t['actor_tokens_per_s']:12.0f}")
            print(f"{r['model']:24} {'ratio actor/bare (>=0.98)':28} {t['ratio']:12.3f}")
        u = r["update"]
        print(f"{r['model']:24} {'update MB':28} {u['bytes'] / 1e6:12.1f}")
        print(f"{r['model']:24} {'pause s':28} {u['pause_s']:12.3f}")
        print(f"{r['model']:24} {'transfer MB/s':28} {u['transfer_mb_per_s']:12.0f}")
        print(f"{r['model']:24} {'bare broadcast s':28} {u['bare_broadcast_s']:12.3f}")
        print(f"{r['model']:24} {'pause / bare (<=1.5)':28} {u['pause_over_bare']:12.2f}")
    out = Path(__file__).resolve().parent / "results" / f"bench_actor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
