"""In-flight against stop-the-world on disjoint hardware: who reaches the targets first.

    python -m benchmarks.bench_race [--seeds 0 1 2] [--steps 60] [--actor-cpus 0] [--learner-cpus 1]

Each run is the whole system (broker, one actor, a one-rank learner) on the tiny model, the actor
and the learner pinned to disjoint CPU sets (placement.*) as they would sit on separate GPUs, with
the same config and seed in both modes; only `weights.mode` (and the max_lag stop-the-world
requires) differ. The clock starts when the learner completes its first step (engine start-up and
the first fetch are not the modes' difference), and the benchmark reports, per mode over the seeds
(median and range):

- time to a reward target: the first step whose trailing mean reward reaches `--reward-target`;
- time to a held-out accuracy target: the first kept checkpoint (every `--eval-every` steps) whose
  greedy accuracy on the task's held-out prompts reaches `--accuracy-target` (scored afterwards
  with a transformers forward, off the clock);
- the balance that explains the ratio: per step, the learner's compute (step time minus the time it
  waited for rollouts) and its wait; in stop-the-world the actor generates while the learner waits,
  so step time ~ generation + compute, in flight ~ max(generation, compute).

Prints a table and writes JSON to benchmarks/results/bench_race-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

RACE_OVERRIDES = [
    "learner.rollouts_per_step=64", "learner.micro_batch_size=32", "actor.sampling.group_size=8",
    "actor.max_groups_in_flight=8", "actor.max_unacked_rollouts=64", "broker.buffer_capacity=128",
    "learner.keep_last_checkpoints=1", "run.keep_rollouts=false", "run.report_to=[jsonl]",
]
"""The race's batch shape (see --help for the knobs that tune the balance)."""

MODES = {"inflight": [], "stop_the_world": ["weights.mode=stop_the_world", "learner.max_lag=0"]}


def run_once(mode: str, seed: int, model: Path, run_dir: Path, steps: int, eval_every: int, placement: list[str],
             extra: list[str], timeout_s: float) -> dict:
    """One whole system until the learner's last step; the metrics records with a clock since step 1."""
    from tether.common.config import load_config, save_resolved
    from tether.common.net import free_port
    from tether.launch.demo import DEFAULT_CONFIG, daemon_specs
    from tether.launch.supervisor import Supervisor

    overrides = [f"run.dir={run_dir}", f"model.path={model}", f"run.seed={seed}", f"task.seed={seed}",
                 f"learner.steps={steps}", f"learner.checkpoint_interval={eval_every}",
                 f"learner.keep_checkpoint_every={eval_every}", f"broker.port={free_port()}",
                 f"broker.store_port={free_port()}", *RACE_OVERRIDES, *placement, *MODES[mode], *extra]
    config = load_config(DEFAULT_CONFIG, overrides)
    run_config = save_resolved(config, run_dir, "run")
    started = time.monotonic()
    with Supervisor(grace_seconds=15.0) as supervisor:
        children = [supervisor.start(spec) for spec in daemon_specs(config, run_config, 1, 1, restarts=0)]
        learner = children[-1]
        if not supervisor.wait_for(learner, timeout=timeout_s) or learner.returncode != 0:
            raise RuntimeError(f"{mode} seed {seed}: the learner did not finish; see {learner.spec.log_path}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records.sort(key=lambda r: r["step"])
    t0 = records[0]["elapsed_s"]
    for r in records:
        r["clock_s"] = r["elapsed_s"] - t0
    return {"mode": mode, "seed": seed, "records": records, "wall_s": time.monotonic() - started,
            "task": config.task}


def held_out_accuracy(checkpoint_hf: Path, task_config) -> float:
    """Greedy accuracy on the task's held-out prompts, with a plain transformers forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.actor.tasks import build_task
    from tether.common.tiny_model import MAX_NEW_TOKENS, greedy_complete

    torch.set_num_threads(2)
    task = build_task(task_config)
    prompts = task.eval_prompts()
    model = AutoModelForCausalLM.from_pretrained(checkpoint_hf, torch_dtype=torch.float32).eval()
    completions = greedy_complete(model, AutoTokenizer.from_pretrained(checkpoint_hf), [p.text for p in prompts],
                                  MAX_NEW_TOKENS)
    return sum(task.reward(p, c) >= 1.0 for p, c in zip(prompts, completions, strict=True)) / len(prompts)


def first_at_or_above(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, value in points if value >= target), None)


def summarize(run: dict, run_dir: Path, reward_target: float, window: int, accuracy_target: float) -> dict:
    records = run["records"]
    rewards = [r.get("reward_mean") or 0.0 for r in records]
    trailing = [(records[i]["clock_s"], sum(rewards[i - window + 1:i + 1]) / window)
                for i in range(window - 1, len(records))]
    by_step = {r["step"]: r for r in records}
    accuracy = []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(checkpoint.name.split("-")[1])
        if step in by_step:
            accuracy.append((by_step[step]["clock_s"], held_out_accuracy(checkpoint / "hf", run["task"]), step))
    compute = [r["step_seconds"] - r.get("fetch_wait_s", 0.0) for r in records[1:]]
    wait = [r.get("fetch_wait_s", 0.0) for r in records[1:]]
    return {
        "mode": run["mode"], "seed": run["seed"], "steps": len(records), "clock_s": records[-1]["clock_s"],
        "time_to_reward_s": first_at_or_above(trailing, reward_target),
        "time_to_accuracy_s": first_at_or_above([(t, a) for t, a, _ in accuracy], accuracy_target),
        "accuracy_curve": [{"step": s, "clock_s": round(t, 2), "accuracy": a} for t, a, s in accuracy],
        "final_trailing_reward": trailing[-1][1] if trailing else None,
        "step_s_median": statistics.median(r["step_seconds"] for r in records[1:]),
        "wall_per_step_s": records[-1]["clock_s"] / max(1, len(records) - 1),
        "learner_compute_s_median": statistics.median(compute), "learner_wait_s_median": statistics.median(wait),
        "dropped": sum(r.get("samples_dropped", 0) for r in records),
        "received": sum(r.get("samples_received", 0) for r in records),
    }


def _median_range(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    present = [v for v in values if v is not None]
    if len(present) < len(values) or not present:
        return None, None, None  # a seed that never reached the target: no fair median
    return statistics.median(present), min(present), max(present)


def report(rows: list[dict], args) -> dict:
    out = {"reward_target": args.reward_target, "accuracy_target": args.accuracy_target, "rows": rows,
           "placement": {"actor_cpus": args.actor_cpus, "learner_cpus": args.learner_cpus}}
    for row in rows:  # JSON of an older run lacks it
        row.setdefault("wall_per_step_s", row["clock_s"] / max(1, row["steps"] - 1))
    for key in ("time_to_reward_s", "time_to_accuracy_s", "clock_s", "wall_per_step_s", "step_s_median",
                "learner_compute_s_median", "learner_wait_s_median"):
        for mode in MODES:
            out[f"{mode}_{key}"] = _median_range([r[key] for r in rows if r["mode"] == mode])
        a, b = out[f"inflight_{key}"][0], out[f"stop_the_world_{key}"][0]
        out[f"ratio_{key}"] = a / b if a and b else None
    return out


def print_table(summary: dict) -> None:
    def fmt(triple) -> str:
        median, low, high = triple
        return "not reached" if median is None else f"{median:7.1f} [{low:.1f}-{high:.1f}]"

    print(f"{'metric (median [min-max] over seeds)':<44} {'in-flight':>22} {'stop-the-world':>22} {'ratio':>7}")
    for key, label in (("time_to_reward_s", f"time to reward {summary['reward_target']} (s)"),
                       ("time_to_accuracy_s", f"time to held-out accuracy {summary['accuracy_target']} (s)"),
                       ("clock_s", "time for all steps (s)"), ("wall_per_step_s", "wall-clock per step (s)"),
                       ("step_s_median", "learner step time (s)"),
                       ("learner_compute_s_median", "learner compute per step (s)"),
                       ("learner_wait_s_median", "learner wait for rollouts per step (s)")):
        ratio = summary[f"ratio_{key}"]
        print(f"{label:<44} {fmt(summary[f'inflight_{key}']):>22} {fmt(summary[f'stop_the_world_{key}']):>22} "
              f"{ratio if ratio is None else round(ratio, 2)!s:>7}")
    for mode in MODES:
        rows = [r for r in summary["rows"] if r["mode"] == mode]
        dropped, received = sum(r["dropped"] for r in rows), sum(r["received"] for r in rows)
        print(f"{mode}: {dropped} of {received} received rollouts dropped stale")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=5, help="checkpoint (and score) every N steps")
    parser.add_argument("--reward-target", type=float, default=0.6)
    parser.add_argument("--window", type=int, default=5, help="trailing steps averaged for the reward target")
    parser.add_argument("--accuracy-target", type=float, default=0.6)
    parser.add_argument("--actor-cpus", default="0")
    parser.add_argument("--learner-cpus", default="1")
    parser.add_argument("--model", default="", help="model directory (default: build the tiny model)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps (smoke test of the benchmark)")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run (e.g. to tune the balance)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 20
    placement = [f"placement.actor_cpus={args.actor_cpus}", f"placement.learner_cpus={args.learner_cpus}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tether-race-") as tmp:
        model = Path(args.model) if args.model else Path(tmp) / "tiny-model"
        if not args.model:
            from tether.common.tiny_model import build_tiny_model

            build_tiny_model(model, seed=0)
        for seed in args.seeds:
            for mode in MODES:
                run_dir = Path(tmp) / f"{mode}-{seed}"
                run = run_once(mode, seed, model, run_dir, args.steps, args.eval_every, placement, args.overrides,
                               args.timeout)
                rows.append(summarize(run, run_dir, args.reward_target, args.window, args.accuracy_target))
                print(f"[race] {mode} seed {seed}: {rows[-1]['clock_s']:.0f} s for {rows[-1]['steps']} steps, "
                      f"reward target at {rows[-1]['time_to_reward_s']}, accuracy target at "
                      f"{rows[-1]['time_to_accuracy_s']}", flush=True)
    summary = report(rows, args)
    print_table(summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_race-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
