"""Actor benchmark: throughput against bare vLLM.

    python -m benchmarks.bench_actor [--quick]

tokens/s: the same AsyncLLM, same settings and prompts, driven bare (llm.generate) and through
ActorEngine.generate (version spans, logprob extraction); alternating trials; ratio actor/bare.
The pause of an in-flight update is benchmarks.bench_weights' (through the production publisher).
Prints a table and writes benchmarks/results/bench_actor-<time>.json.
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


async def bench_model(name: str, model_dir: Path, quick: bool) -> dict:
    from tether.actor.engine import ActorEngine
    from tether.common.config import EngineConfig, ModelConfig

    engine = await ActorEngine.start(EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=256),
                                     ModelConfig(dtype="float32"), str(model_dir))
    try:
        prompts = [[(3 * i + j) % 250 + 3 for j in range(8)] for i in range(32 if quick else 64)]
        return {"model": name,
                "throughput": await _throughput(engine, prompts, 32 if quick else 64, 3 if quick else 5)}
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from tether.actor.testing import build_random_qwen2

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_random_qwen2(Path(tmp) / "tiny", seed=0)
        results = [asyncio.run(bench_model("tiny (random, ~0.5M)", tiny, args.quick))]
    print(f"\n{'model':24} {'metric':28} {'value':>12}")
    for r in results:
        t = r["throughput"]
        print(f"{r['model']:24} {'bare vLLM tokens/s':28} {t['bare_tokens_per_s']:12.0f}")
        print(f"{r['model']:24} {'actor tokens/s':28} {t['actor_tokens_per_s']:12.0f}")
        print(f"{r['model']:24} {'ratio actor/bare (>=0.98)':28} {t['ratio']:12.3f}")
    out = Path(__file__).resolve().parent / "results" / f"bench_actor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
