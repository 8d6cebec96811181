"""Learner benchmark: optimizer-step throughput on the tiny model (or --model), device-agnostic.

    python -m benchmarks.bench_learner [--model DIR] [--steps 5] [--groups 8] [--group-size 8] [--max-tokens 64]

Runs the real Learner on locally sampled rollouts (one process; on CUDA a 1-rank NCCL group with
FSDP2 and bf16 body, on CPU unsharded fp32). Reports per-step time, completion and sequence
tokens/s, and on CUDA the model FLOPs utilisation (6 * parameters * sequence tokens per second
over the GPU's peak dense bf16 FLOP/s, --peak-tflops). The first step is warm-up and not counted.
Prints a table and writes JSON to benchmarks/results/bench_learner-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="HF model dir; empty: a fresh random tiny model")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--algorithm", default="grpo")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()

    from transformers import AutoModelForCausalLM

    from tether.common.config import load_config
    from tether.common.messages import SamplingSpec
    from tether.learner.source import InMemoryBatchSource
    from tether.learner.synthetic import sample_rollouts
    from tether.learner.trainer import Learner

    work = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    model_dir = Path(args.model) if args.model else work / "model"
    if not args.model:
        from tether.common.tiny_model import build_tiny_model

        build_tiny_model(model_dir, seed=0, warm_start=False)
    if cuda:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    sampler = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to("cuda" if cuda else "cpu")
    sampling = SamplingSpec(temperature=1.0, max_tokens=args.max_tokens)
    with torch.device("cuda" if cuda else "cpu"):
        rollouts = sample_rollouts(sampler, groups=args.groups, group_size=args.group_size, prompt_len=args.prompt_len,
                                   max_tokens=args.max_tokens, sampling=sampling)
    parameters = sum(p.numel() for p in sampler.parameters())
    del sampler
    n = args.groups * args.group_size
    config = load_config(None, [
        f"run.dir={work / 'run'}", f"model.path={model_dir}", "learner.publish_to=none", "learner.resume=false",
        f"learner.rollouts_per_step={n}", f"learner.micro_batch_size={min(args.micro_batch, n)}",
        f"actor.sampling.group_size={args.group_size}", f"learner.algorithm={args.algorithm}",
        f"learner.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"learner.max_lag={args.steps + 1}", f"actor.sampling.max_tokens={args.max_tokens}",
        f"actor.engine.max_model_len={args.prompt_len + args.max_tokens + 1}",
    ])
    learner = Learner(config, model_dir, source=InMemoryBatchSource(rollouts))
    rows = []
    for _ in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        rows.append(learner.step())
    timed = rows[1:]
    step_s = statistics.median(r["step_seconds"] for r in timed)
    seq_tokens = n * (args.prompt_len + args.max_tokens)
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {args.threads} thread)",
        "parameters": parameters, "rollouts_per_step": n, "completion_tokens_per_step": n * args.max_tokens,
        "sequence_tokens_per_step": seq_tokens, "steps_timed": len(timed), "algorithm": args.algorithm,
        "body_dtype": str(learner.body_dtype), "sharded": learner.shard,
        "step_seconds_median": step_s, "steps_per_s": 1 / step_s,
        "completion_tokens_per_s": n * args.max_tokens / step_s, "sequence_tokens_per_s": seq_tokens / step_s,
        "activation_checkpointing": args.activation_checkpointing,
    }
    if cuda:
        result["mfu"] = 6 * parameters * seq_tokens / step_s / (args.peak_tflops * 1e12)
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    out = Path(__file__).resolve().parent / "results" / f"bench_learner-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    learner.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
