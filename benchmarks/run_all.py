"""Every tether benchmark in one run: one table, one JSON (`make bench`).

    python -m benchmarks.run_all [--quick] [--model DIR] [--skip NAME,...]

Runs, each as its own process so that each keeps its own JSON in benchmarks/results/:
  actor    benchmarks.bench_actor               actor tokens/s against bare vLLM (ratio)
  weights  benchmarks.bench_weights             in-flight update pause against a bare broadcast of the
                                                same bytes (ratio), tiny model and ~100M parameters
  race     launch/run_local.sh twice (this file) in-flight against stop-the-world: wall-clock to a
                                                reward target on the toy task, same seed (ratio)
  broker   benchmarks.bench_broker              rollouts/s and ack latency, journal on and off
  learner  benchmarks.bench_learner             learner completion tokens/s
and writes benchmarks/results/run_all-<time>.json with every row and every sub-benchmark's JSON.
Timings on a shared machine are noisy: the ratios are measured side by side within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from tether.common.net import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _newest(prefix: str, since: float) -> Path | None:
    files = [p for p in RESULTS.glob(f"{prefix}-*.json") if p.stat().st_mtime >= since]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def run_module(name: str, args: list[str], timeout_s: float) -> dict:
    """Run `python -m benchmarks.<name> args`, return {"ok", "json", "seconds", "error"}."""
    start = time.time()
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    print(f"[bench] {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s", "seconds": time.time() - start}
    path = _newest(name, start)
    if proc.returncode != 0 or path is None:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail}", "seconds": time.time() - start}
    return {"ok": True, "json": json.loads(path.read_text()), "path": str(path), "seconds": time.time() - start}


# ------------------------------------------------------------------ in-flight vs stop-the-world race
def mode_overrides(mode: str) -> list[str]:
    """Overrides selecting a weights mode; stop-the-world is strictly on-policy, so it requires max_lag=0."""
    return [f"weights.mode={mode}"] + (["learner.max_lag=0"] if mode == "stop_the_world" else [])


def _stop_the_world_available() -> str | None:
    """None if the config accepts weights.mode=stop_the_world with the race's overrides; else why not.

    Whether the daemons implement the mode is what running it finds out (race() reports a failed
    run with its error), not a search of their source text.
    """
    try:
        from tether.common.config import load_config

        load_config(str(ROOT / "configs" / "demo.yaml"), mode_overrides("stop_the_world"))
    except Exception as exc:  # report rather than fake
        return f"config rejects weights.mode=stop_the_world ({type(exc).__name__}: {exc})"
    return None


def race_one(mode: str, model: str, run_dir: Path, steps: int, seed: int, timeout_s: float) -> dict:
    """One whole system (broker, 1 actor, 1 learner rank) via launch/run_local.sh; step arrival times."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    # Free ports: other tether runs on this machine may hold the defaults.
    overrides = [f"broker.port={free_port()}", f"broker.store_port={free_port()}", f"run.dir={run_dir}", f"model.path={model}", f"learner.steps={steps}", f"run.seed={seed}",
                 *mode_overrides(mode)]
    env = dict(os.environ, PYTHON=sys.executable)
    start = time.perf_counter()
    arrivals: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:  # wall-clock of each step as its metrics line lands
        while not stop.is_set():
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    try:
                        step = int(json.loads(line)["step"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    arrivals.setdefault(step, time.perf_counter() - start)
            stop.wait(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = subprocess.run(["bash", str(ROOT / "launch" / "run_local.sh"), str(ROOT / "configs" / "demo.yaml"),
                               "--actors", "1", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        code, tail = 124, f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    records = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    records = sorted((r for r in records if "step" in r), key=lambda r: r["step"])
    for r in records:
        r["wall_s"] = arrivals.get(int(r["step"]), wall)
    return {"mode": mode, "exit": code, "wall_s": wall, "steps_done": len(records),
            "rewards": [r.get("reward_mean") for r in records],
            "final_reward_mean3": (sum(r.get("reward_mean") or 0.0 for r in records[-3:]) / min(3, len(records))
                                   if records else None), "step_wall_s": [r["wall_s"] for r in records],
            "error": None if code == 0 and len(records) >= steps else tail}


def time_to_target(result: dict, target: float, window: int) -> float | None:
    """Wall-clock at the first step whose trailing `window`-step mean reward reaches `target`."""
    rewards = [r if r is not None else 0.0 for r in result["rewards"]]
    for i in range(window - 1, len(rewards)):
        if sum(rewards[i - window + 1:i + 1]) / window >= target:
            return result["step_wall_s"][i]
    return None


def race(model: str, steps: int, target: float, window: int, seed: int, out_dir: Path, timeout_s: float) -> dict:
    """In-flight and stop-the-world on the same seed and steps; ratio of wall-clock to the target."""
    unavailable = _stop_the_world_available()
    runs = {"inflight": race_one("inflight", model, out_dir / "inflight", steps, seed, timeout_s)}
    if unavailable is None:
        runs["stop_the_world"] = race_one("stop_the_world", model, out_dir / "stop_the_world", steps, seed, timeout_s)
        if runs["stop_the_world"]["error"]:
            unavailable = "stop_the_world run failed: " + runs["stop_the_world"]["error"][-400:]
    out = {"target": target, "window": window, "steps": steps, "seed": seed, "runs": runs,
           "stop_the_world_unavailable": unavailable}
    for mode, r in runs.items():
        out[f"{mode}_time_to_target_s"] = time_to_target(r, target, window) if not r["error"] else None
        out[f"{mode}_wall_s"] = r["step_wall_s"][-1] if r["step_wall_s"] and not r["error"] else None
    a, b = out.get("inflight_time_to_target_s"), out.get("stop_the_world_time_to_target_s")
    out["ratio_time_to_target"] = a / b if a and b else None
    a, b = out.get("inflight_wall_s"), out.get("stop_the_world_wall_s")
    out["ratio_wall_for_steps"] = a / b if a and b else None
    return out


# ------------------------------------------------------------------ table
def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(benchmark, metric, value, reference / note) rows of the one table."""
    rows = []
    actor = results.get("actor", {})
    if actor.get("ok"):
        t = actor["json"][0]["throughput"]
        rows += [("actor", "tokens/s actor / bare vLLM (ratio)", _fmt(t["ratio"]),
                  f"{t['actor_tokens_per_s']:.0f} vs {t['bare_tokens_per_s']:.0f} tok/s, tiny random model")]
    else:
        rows.append(("actor", "tokens/s actor / bare vLLM", "failed" if "error" in actor else "skipped", actor.get("error", "")[:80]))
    weights = results.get("weights", {})
    if weights.get("ok"):
        for w in weights["json"]:
            label = f"{w['model']}, {w['parameters'] / 1e6:.0f}M"
            m, lo, hi = w["median"], w["spread"]["pause_over_bare"][0], w["spread"]["pause_over_bare"][1]
            rows.append(("weights", f"update pause / bare broadcast ({label})", _fmt(m["pause_over_bare"]),
                         f"{m['pause_s'] * 1e3:.0f} vs {m['bare_broadcast_s'] * 1e3:.0f} ms for {w['bytes'] / 1e6:.0f} MB, "
                         f"median of {len(w['updates'])} (ratio {lo:.2f}-{hi:.2f})"))
            rows.append(("weights", f"  pause s ({label})", _fmt(m["pause_s"]),
                         f"pause() {m['pause_call_s'] * 1e3:.0f} ms (the step in progress), commit "
                         f"{m['actor_load_s'] * 1e3:.1f} ms, resume {m['resume_s'] * 1e3:.1f} ms"))
            rows.append(("weights", f"  before the pause, generating, s ({label})", _fmt(m["ready_s"]),
                         f"receive {m['actor_receive_s']:.2f}, stage {m['actor_stage_s']:.2f}; learner gather "
                         f"{m['learner_gather_s']:.2f}, broadcast {m['learner_broadcast_s']:.2f}; tokens/s "
                         f"{m['tokens_per_s_ready']:.0f} vs {m['tokens_per_s_before']:.0f} before"))
    else:
        rows.append(("weights", "pause / bare broadcast", "failed" if "error" in weights else "skipped", weights.get("error", "")[:80]))
    rc = results.get("race")
    if rc is None:
        rows.append(("race", "in-flight / stop-the-world", "skipped", ""))
    elif rc["stop_the_world_unavailable"]:
        inflight = rc.get("inflight_time_to_target_s")
        rows.append(("race", "in-flight / stop-the-world, time to target", "not available",
                     rc["stop_the_world_unavailable"][:100]))
        rows.append(("race", f"in-flight time to reward {rc['target']} s", _fmt(inflight, ".1f"),
                     f"{rc['steps']} steps, trailing mean of {rc['window']}"))
    else:
        rows.append(("race", f"in-flight / stop-the-world, time to reward {rc['target']}",
                     _fmt(rc["ratio_time_to_target"]),
                     f"{_fmt(rc['inflight_time_to_target_s'], '.1f')} vs "
                     f"{_fmt(rc['stop_the_world_time_to_target_s'], '.1f')} s (n/a: not reached)"))
        rows.append(("race", f"in-flight / stop-the-world, wall for {rc['steps']} steps", _fmt(rc["ratio_wall_for_steps"]),
                     f"{_fmt(rc['inflight_wall_s'], '.1f')} vs {_fmt(rc['stop_the_world_wall_s'], '.1f')} s"))
        rows.append(("race", "reward, mean of last 3 steps (in-flight, stop-the-world)",
                     _fmt(rc["runs"]["inflight"]["final_reward_mean3"]),
                     f"stop-the-world {_fmt(rc['runs']['stop_the_world']['final_reward_mean3'])}"))
    broker = results.get("broker", {})
    if broker.get("ok"):
        b = broker["json"]
        for r in b.get("rows", []):
            rows.append(("broker", f"rollouts/s, {r['label']}", _fmt(r["rollouts_per_s"], ".0f"),
                         f"{b['actors']} actors, {b['tokens']} tokens; ack p50 {_fmt(r['ack_p50_ms'], '.1f')} ms, "
                         f"p99 {_fmt(r['ack_p99_ms'], '.1f')} ms; broker CPU {r['broker_cpu_pct']:.0f}%, "
                         f"{_fmt(r['broker_cpu_us_per_rollout'], '.0f')} us/rollout"))
        for r in b.get("inproc", []):
            parked = ", requests parked" if r.get("parked_requests") else ""
            rows.append(("broker", f"alone, us CPU/rollout, journal {'on' if r['journal'] else 'off'}{parked}",
                         _fmt(r["cpu_us_per_rollout"], ".0f"),
                         f"in process, no sockets: {r['rollouts_per_cpu_s']:.0f} rollouts per CPU-second"))
    else:
        rows.append(("broker", "rollouts/s", "failed" if "error" in broker else "skipped", broker.get("error", "")[:80]))
    learner = results.get("learner", {})
    if learner.get("ok"):
        m = learner["json"]
        rows.append(("learner", "completion tokens/s", _fmt(m["completion_tokens_per_s"], ".0f"),
                     f"{m['parameters'] / 1e6:.1f}M params, {m['algorithm']}, {m['device']}"))
    else:
        rows.append(("learner", "tokens/s", "failed" if "error" in learner else "skipped", learner.get("error", "")[:80]))
    return rows


def format_table(rows) -> str:
    head = f"{'benchmark':9} {'metric':52} {'value':>13}  note"
    return "\n".join([head, "-" * len(head)] + [f"{b:9} {m:52} {v:>13}  {n}" for b, m, v, n in rows])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print one table, write one JSON; 0 even when a row failed (the row says so)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs of everything")
    parser.add_argument("--model", default="", help="tiny model for the race (default: build the embedded one)")
    parser.add_argument("--skip", default="", help="comma-separated: actor,weights,race,broker,learner")
    parser.add_argument("--race-steps", type=int, default=0, help="learner steps per race run (default 20, quick 8)")
    parser.add_argument("--reward-target", type=float, default=0.40)
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    q = args.quick
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.time()
    results: dict = {}
    if "actor" not in skip:
        results["actor"] = run_module("bench_actor", ["--quick"] if q else [], 1200)
    if "weights" not in skip:
        results["weights"] = run_module("bench_weights", ["--quick"] if q else [], 1200)
    if "race" not in skip:
        model = args.model
        if not model:
            model = str(RESULTS / "tiny-model")
            if not (Path(model) / "config.json").is_file():
                from tether.common.tiny_model import build_tiny_model

                build_tiny_model(model, seed=0)
        steps = args.race_steps or (8 if q else 20)
        print(f"[bench] race: in-flight vs stop-the-world, {steps} steps, model {model}", flush=True)
        results["race"] = race(model, steps, args.reward_target, 3, 0, RESULTS / f"race-{stamp}", 900)
    if "broker" not in skip:
        results["broker"] = run_module("bench_broker", ["--quick"] if q else [], 600)
    if "learner" not in skip:
        results["learner"] = run_module("bench_learner", ["--steps", "3"] if q else [], 900)
    rows = table_rows(results)
    print()
    print(format_table(rows))
    out = RESULTS / f"run_all-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": q, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                        "platform": platform.platform()},
                               "seconds": time.time() - started, "rows": rows, "results": results},
                              indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
