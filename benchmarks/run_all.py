"""Every tether benchmark in one run: one table, one JSON (`make bench`).

    python -m benchmarks.run_all [--quick] [--model DIR] [--skip NAME,...]

Runs, each as its own process so that each keeps its own JSON in benchmarks/results/:
  actor    benchmarks.bench_actor               actor tokens/s against bare vLLM (ratio)
  weights  benchmarks.bench_weights             in-flight update pause against a bare broadcast of the
                                                same bytes (ratio), tiny model and ~100M parameters
  race     benchmarks.bench_race                in-flight against stop-the-world on disjoint CPU sets:
                                                time to a reward and a held-out accuracy target from
                                                the first learner step, same seeds (ratio, median)
  chaos    benchmarks.bench_chaos               recovery time per fault and the exactly-once audit
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
import time
from pathlib import Path

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
    race = results.get("race", {})
    if race.get("ok"):
        r = race["json"]
        for key, label in (("time_to_reward_s", f"time to reward {r['reward_target']}"),
                           ("time_to_accuracy_s", f"time to held-out accuracy {r['accuracy_target']}"),
                           ("step_s_median", "step time")):
            inflight, stw = r[f"inflight_{key}"][0], r[f"stop_the_world_{key}"][0]
            rows.append(("race", f"in-flight / stop-the-world, {label}", _fmt(r[f"ratio_{key}"]),
                         f"{_fmt(inflight, '.1f')} vs {_fmt(stw, '.1f')} s, median of {len(r['rows']) // 2} seeds "
                         f"(n/a: a seed missed the target); goal <= 0.6"))
        for mode in ("inflight", "stop_the_world"):
            rows.append(("race", f"  learner compute / wait per step, {mode}",
                         _fmt(r[f"{mode}_learner_compute_s_median"][0]),
                         f"wait {_fmt(r[f'{mode}_learner_wait_s_median'][0])} s; actor cpus "
                         f"{r['placement']['actor_cpus']}, learner cpus {r['placement']['learner_cpus']}"))
        dropped = sum(x["dropped"] for x in r["rows"] if x["mode"] == "inflight")
        received = sum(x["received"] for x in r["rows"] if x["mode"] == "inflight")
        rows.append(("race", "  in-flight rollouts dropped stale", _fmt(dropped / received if received else None),
                     f"{dropped} of {received} received; goal <= 0.02"))
    else:
        rows.append(("race", "in-flight / stop-the-world", "failed" if "error" in race else "skipped",
                     race.get("error", "")[:80]))
    chaos = results.get("chaos", {})
    if chaos.get("ok"):
        c = chaos["json"]
        for f in c["faults"]:
            rows.append(("chaos", f"recovery s, {f['fault']}", _fmt(f["recovery_s"], ".1f"),
                         f"at step {f['at_step']}, steps lost {f['steps_lost']}, dropped stale {f['dropped_stale']}"))
        a = c.get("audit") or {}
        rows.append(("chaos", "acked rollouts lost / trained twice", f"{a.get('lost')} / {a.get('trained_twice')}",
                     f"acked {a.get('acked')}, trained {a.get('trained')}, dropped {a.get('dropped')}, "
                     f"buffered {a.get('buffered')}; books balance {c.get('books_balance')}"))
    else:
        rows.append(("chaos", "recovery", "failed" if "error" in chaos else "skipped", chaos.get("error", "")[:80]))
    broker = results.get("broker", {})
    if broker.get("ok"):
        b = broker["json"]
        for r in b.get("rows", []):
            rows.append(("broker", f"rollouts/s, {r['label']}", _fmt(r["rollouts_per_s"], ".0f"),
                         f"{b['actors']} actors, {b['tokens']} tokens; ack p50 {_fmt(r['ack_p50_ms'], '.1f')} ms, "
                         f"p99 {_fmt(r['ack_p99_ms'], '.1f')} ms; broker CPU {r['broker_cpu_pct']:.0f}%, "
                         f"{_fmt(r['broker_cpu_us_per_rollout'], '.0f')} us/rollout"))
        if b.get("of_echo") is not None:
            rows.append(("broker", "broker / bare ZeroMQ echo, rollouts/s", _fmt(b["of_echo"], ".2f"),
                         f"journal on, saturated; broker on CPUs {b.get('broker_cpus') or 'any'}, "
                         f"load on CPUs {b.get('load_cpus') or 'any'}"))
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
    parser.add_argument("--skip", default="", help="comma-separated: actor,weights,race,chaos,broker,learner")
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
        race_args = ["--quick"] if q else []
        if args.model:
            race_args += ["--model", args.model]
        results["race"] = run_module("bench_race", race_args, 6 * 3600)
    if "chaos" not in skip:
        results["chaos"] = run_module("bench_chaos", [], 1800)
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
