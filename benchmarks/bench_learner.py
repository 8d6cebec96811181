"""Learner benchmark: optimizer-step memory and throughput, before and after completion-only chunked logprobs.

    python -m benchmarks.bench_learner [--steps 3] [--threads 1] [--skip-150k]

Runs the real Learner (tether.learner.trainer) on a fixed batch of synthetic rollouts, one fresh
process per row so that each row's peak memory is its own, for two models:
  tiny  the embedded tiny model's architecture (vocabulary 257), 64 rollouts of 32 + 64 tokens;
  150k  a random 2-layer Qwen2 with a 151,936-token vocabulary (Qwen2.5's), 16 rollouts of 96 + 32 tokens;
and three ways of computing the completion logprobs:
  before        the previous computation: fp32 logits at every position, [B, T, V], processed whole
                (tether.learner.completion.reference_completion_logprobs);
  after         lm_head and logprob processing at completion positions only (learner.logits_chunk_mb=256);
  after, 16 MB  the same in chunks of at most 16 MB of logits, recomputed in backward.
Columns: median optimizer-step time over --steps timed steps (one warm-up step first), completion and
sequence tokens/s, and the peak memory a step takes beyond what persists between steps (weights,
gradients, optimizer state), measured over the timed steps: CUDA max_memory_allocated minus the
allocation before them; CPU peak RSS (VmHWM, reset after the warm-up) minus the RSS before them, with
glibc returning every allocation of 64 KiB or more to the system when freed (MALLOC_MMAP_THRESHOLD_),
so freed logits do not stay resident. On CUDA the learner is FSDP2 on a one-rank NCCL group
with a bf16 body; on CPU it is unsharded fp32. Ratios are side by side within one run.
Prints a table and writes JSON to benchmarks/results/bench_learner-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tether.common.net import free_port

MODELS = {
    "tiny": {"vocab": 257, "groups": 8, "group_size": 8, "prompt_len": 32, "max_tokens": 64, "micro_batch": 16},
    "150k": {"vocab": 151936, "groups": 4, "group_size": 4, "prompt_len": 96, "max_tokens": 32, "micro_batch": 8},
}
VARIANTS = {"before": None, "after": 256.0, "after, 16 MB": 16.0}
"""Variant -> learner.logits_chunk_mb (None: the previous, full-logits computation)."""


def build_model(name: str, out: Path) -> Path:
    """The model directory of a MODELS entry (random weights; the benchmark measures cost, not quality)."""
    if name == "tiny":
        from tether.common.tiny_model import build_tiny_model

        build_tiny_model(out, seed=0, warm_start=False)
    else:
        from tether.actor.testing import build_random_qwen2

        build_random_qwen2(out, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=768,
                           vocab_size=MODELS[name]["vocab"], head_std=0.02, seed=0)
    return out


def synthetic_rollouts(groups: int, group_size: int, prompt_len: int, max_tokens: int, vocab: int, seed: int = 0):
    """Random prompts and completions with plausible behaviour logprobs and group-varying rewards."""
    import numpy as np

    from tether.common.messages import Rollout, SamplingSpec, float32_array, int32_array

    rng = np.random.default_rng(seed)
    sampling = SamplingSpec(temperature=1.0, max_tokens=max_tokens)
    rollouts = []
    for g in range(groups):
        prompt = rng.integers(0, vocab, prompt_len)
        for i in range(group_size):
            rollouts.append(Rollout(
                rollout_id=f"b{g}-{i}", group_id=f"g{g}", group_size=group_size, actor_id="bench", task="bench",
                prompt_token_ids=int32_array(prompt), completion_token_ids=int32_array(rng.integers(0, vocab, max_tokens)),
                logprobs=float32_array(-np.log(vocab) + rng.normal(0, 0.1, max_tokens).clip(max=0)),
                versions=int32_array(np.zeros(max_tokens)), reward=float(rng.random()), sampling=sampling,
                finish_reason="length"))
    return rollouts


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(spec: dict) -> dict:
    """One row, in this process: load, one warm-up step, `steps` timed steps."""
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    from tether.common.config import load_config
    from tether.learner import trainer
    from tether.learner.completion import reference_completion_logprobs
    from tether.learner.source import InMemoryBatchSource

    m = MODELS[spec["model"]]
    n = m["groups"] * m["group_size"]
    chunk = spec["chunk_mb"]
    if chunk is None:  # the previous computation, behind the same call
        trainer.completion_logprobs = lambda model, *args, chunk_bytes=None: reference_completion_logprobs(model, *args)
    if cuda:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(spec["port"]))
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    work = Path(spec["work"])
    config = load_config(None, [
        f"run.dir={work / 'run'}", f"model.path={spec['model_dir']}", "learner.publish_to=none",
        "learner.resume=false", f"learner.rollouts_per_step={n}", f"learner.micro_batch_size={m['micro_batch']}",
        f"actor.sampling.group_size={m['group_size']}", f"learner.max_lag={spec['steps'] + 2}",
        f"actor.sampling.max_tokens={m['max_tokens']}", f"actor.engine.max_model_len={m['prompt_len'] + m['max_tokens'] + 1}",
        f"learner.logits_chunk_mb={chunk or 256.0}",
    ])
    rollouts = synthetic_rollouts(m["groups"], m["group_size"], m["prompt_len"], m["max_tokens"], m["vocab"])
    learner = trainer.Learner(config, spec["model_dir"], source=InMemoryBatchSource(rollouts))
    parameters = sum(p.numel() for p in learner.model.parameters())
    seconds = []
    for step in range(spec["steps"] + 1):
        if step == 1:  # after the warm-up: gradients and optimizer state exist; measure what a step adds
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                baseline = torch.cuda.memory_allocated()
            else:
                _reset_peak_rss()
                baseline = _status_kib("VmRSS") * 1024
        if cuda:
            torch.cuda.synchronize()
        record = learner.step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(record["step_seconds"])
    step_s = statistics.median(seconds[1:])
    if cuda:
        peak, total = torch.cuda.max_memory_allocated() - baseline, torch.cuda.max_memory_allocated()
    else:
        total = _status_kib("VmHWM") * 1024
        peak = total - baseline
    learner.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {
        "model": spec["model"], "variant": spec["variant"], "vocab": m["vocab"], "parameters": parameters,
        "rollouts_per_step": n, "prompt_tokens": m["prompt_len"], "completion_tokens": m["max_tokens"],
        "micro_batch": m["micro_batch"], "logits_chunk_mb": chunk, "step_seconds_median": step_s,
        "completion_tokens_per_s": n * m["max_tokens"] / step_s,
        "sequence_tokens_per_s": n * (m["prompt_len"] + m["max_tokens"]) / step_s,
        "peak_step_memory_mib": peak / 2**20, "peak_total_memory_mib": total / 2**20,
        "memory_measure": "cuda max_memory_allocated" if cuda else "cpu peak RSS (VmHWM)",
        "body_dtype": str(learner.body_dtype), "sharded": learner.shard, "steps_timed": len(seconds) - 1,
        "loss_last": record["loss"],
    }


def _run_row(spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_learner", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "65536"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"model": spec["model"], "variant": spec["variant"], "error": (proc.stdout + proc.stderr)[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--skip-150k", action="store_true", help="only the tiny model")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {args.threads} thread)"
    work = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    rows = []
    for model in [m for m in MODELS if not (args.skip_150k and m == "150k")]:
        model_dir = build_model(model, work / model)
        for variant, chunk in VARIANTS.items():
            spec = {"model": model, "model_dir": str(model_dir), "variant": variant, "chunk_mb": chunk,
                    "steps": args.steps, "threads": args.threads, "work": str(work / f"{model}-{len(rows)}"),
                    "port": free_port()}
            print(f"[bench_learner] {model} / {variant} ...", flush=True)
            rows.append(_run_row(spec, args.timeout))
    _print(rows, device)
    tiny_after = next((r for r in rows if r["model"] == "tiny" and r["variant"] == "after" and "error" not in r), {})
    result = {
        "device": device, "rows": rows,
        # the production path on the tiny model, under the keys benchmarks/run_all.py reads
        "completion_tokens_per_s": tiny_after.get("completion_tokens_per_s"),
        "parameters": tiny_after.get("parameters"), "algorithm": "grpo",
    }
    for model in MODELS:
        before = next((r for r in rows if r["model"] == model and r["variant"] == "before" and "error" not in r), None)
        after = next((r for r in rows if r["model"] == model and r["variant"] == "after" and "error" not in r), None)
        if before and after:
            result[f"{model}_speedup"] = after["completion_tokens_per_s"] / before["completion_tokens_per_s"]
            result[f"{model}_memory_ratio"] = after["peak_step_memory_mib"] / max(before["peak_step_memory_mib"], 1e-9)
    out = Path(__file__).resolve().parent / "results" / f"bench_learner-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _print(rows: list[dict], device: str) -> None:
    print(f"\nlearner step, {device}")
    header = (f"{'model':6} {'variant':14} {'step s':>8} {'compl tok/s':>12} {'seq tok/s':>10} {'step MiB':>9} "
              f"{'total MiB':>9} {'vs before':>22}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['variant']:14} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        base = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "before" and "error" not in b), None)
        ratio = "" if base is None or base is r else (
            f"x{r['completion_tokens_per_s'] / base['completion_tokens_per_s']:.2f} tok/s, "
            f"x{r['peak_step_memory_mib'] / max(base['peak_step_memory_mib'], 1e-9):.2f} mem")
        print(f"{r['model']:6} {r['variant']:14} {r['step_seconds_median']:8.3f} {r['completion_tokens_per_s']:12.0f} "
              f"{r['sequence_tokens_per_s']:10.0f} {r['peak_step_memory_mib']:9.0f} {r['peak_total_memory_mib']:9.0f} "
              f"{ratio:>22}")


if __name__ == "__main__":
    main()
