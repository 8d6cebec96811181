"""Broker benchmark: rollouts/s and ack latency of a real broker daemon under 64 actors, journal on and off.

    python -m benchmarks.bench_broker [--quick] [--actors 64] [--procs 4] [--seconds 10] [--tokens 1000]
                                      [--group-size 8] [--window 2] [--rate 20000] [--modes echo,saturate,half,goal]
                                      [--journal on,off] [--broker-cpus auto] [--load-cpus auto] [--profile DIR]

A broker daemon (`python -m tether.broker`) runs as a subprocess on 127.0.0.1. The load comes
from `--procs` client processes (benchmarks/broker_load.py) that drive the actors over raw
ZeroMQ DEALER sockets with SubmitRollouts messages encoded before the clock starts, one whole group
of `--group-size` rollouts per message as actor daemons send them; a learner process leases
batches and commits each one, so the buffer never fills. The broker runs on its own CPUs and the
load on the others (by default the last CPU and the rest; `--broker-cpus none` shares them all), so
the load generator does not take the broker's CPU, as actors on other nodes would not. Each
configuration runs on a fresh broker with a fresh run directory:

  echo       benchmarks/broker_echo.py in the broker's place, saturated: the bare transport answers
             every message and does nothing else. The broker's saturated rate over this one is the
             share of the transport's ceiling (on the same CPUs, with the same load) it reaches.
  saturate   every actor keeps `--window` messages in flight: the most the broker sustains. Ack
             latency here is queueing (Little's law: in flight / throughput), not service time.
  goal       the clients offer `--rate` rollouts/s in total (the issue's goal, 20k/s), window as a
             cap: whether the broker keeps up, and the latency an actor sees at that load.
  half       the clients offer half of what saturate reached: latency with headroom.

each with the journal on (the default, fsync every second) and off (`broker.journal_path=''`).
Last, `benchmarks.broker_inproc` feeds the same messages to the broker's state machine in this
process: its CPU per rollout is the broker's own cost, whatever the load generator takes.
Latency is send to Ack of one message, measured in the client. CPU is per process over the
measurement window (100% = one core): broker (all its threads; "loop" is the Python thread that
runs the server loop, the rest is ZeroMQ's I/O thread and the journal's fsync), clients, learner,
and the whole machine (other work on a shared machine shows up as the difference). A codec micro-benchmark (SubmitRollouts encode,
decode with validation) runs first. Prints a table; writes benchmarks/results/bench_broker-<time>.json.
`--profile DIR` samples the broker with py-spy (pip install py-spy) during each window and writes
collapsed stacks to DIR.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import broker_inproc
from benchmarks.broker_load import (
    LoadSpec,
    actor_process,
    learner_process,
    make_rollout,
    wait_for_broker,
)
from tether.common import wire
from tether.common.config.placement import parse_ids
from tether.common.logging import configure_logging
from tether.common.messages import SubmitRollouts
from tether.common.net import free_port
from tether.launch.placement import available_cpus_here, format_ids

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB_SIZE = 32000
GOAL_ROLLOUTS_PER_S = 20_000
GOAL_P99_MS = 20.0


def bench_wire(tokens: int, group_size: int, seconds: float = 1.0) -> dict:
    """Encode and decode (with every record check) of one SubmitRollouts message, in this process."""
    spec = LoadSpec(port=0, group_size=group_size, tokens=tokens, prompt_tokens=128, vocab_size=VOCAB_SIZE,
                    window=1, rate=0.0)
    rng = np.random.default_rng(0)
    body = SubmitRollouts(rollouts=[make_rollout(f"r{i}", "g", spec, "a", rng) for i in range(group_size)])
    data = wire.encode(body, sender="a")

    def rate(fn) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - t0)

    enc = rate(lambda: wire.encode(body, sender="a"))
    dec = rate(lambda: wire.decode(data))
    return {"message_bytes": len(data), "rollouts_per_message": group_size, "encode_msgs_per_s": enc,
            "decode_msgs_per_s": dec, "decode_rollouts_per_s": dec * group_size,
            "decode_mb_per_s": dec * len(data) / 1e6}


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU of a process, all threads (the broker's ZeroMQ I/O thread included), or
    of its thread `tid` alone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


def _broker_command(args, port: int, run_dir: Path, journal: bool, batch: int, echo: bool = False) -> list[str]:
    pin = [sys.executable, "-m", "tether.launch.placement", "pin", args.broker_cpus, "--"] if args.broker_cpus else []
    if echo:
        return [*pin, sys.executable, "-m", "benchmarks.broker_echo", f"--port={port}",
                f"--group-size={args.group_size}"]
    model_dir = run_dir / "model"  # only a config.json: the broker then range-checks token ids
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": VOCAB_SIZE}))
    in_flight = args.actors * args.window * args.group_size
    return [
        *pin, sys.executable, "-m", "tether.broker",
        f"broker.port={port}", "broker.host=127.0.0.1", "broker.host_store=false", f"run.dir={run_dir}",
        "run.log_level=warning", f"model.path={model_dir}", "broker.peer_timeout_s=60",
        # Room for everything in flight plus batches the learner has not fetched yet: the learner
        # must never make actors retry (that would measure the learner, not the broker).
        f"broker.buffer_capacity={in_flight + 8 * batch}",
        f"actor.sampling.group_size={args.group_size}", f"actor.sampling.max_tokens={args.tokens}",
        f"actor.engine.max_model_len={args.tokens + 1024}", f"learner.rollouts_per_step={batch}",
        *([] if journal else ["broker.journal_path=''"]),  # quoted: a bare empty value reads as null
        *args.set,
    ]


def run_config(args, *, journal: bool, rate: float, mode: str) -> dict:
    """One fresh broker under one load (`rate` rollouts/s offered; 0: saturate); returns the row.
    Mode "echo": benchmarks/broker_echo.py in the broker's place, saturated (`journal` is ignored)."""
    echo = mode == "echo"
    if echo:
        label = "bare ZeroMQ echo, saturate"
    else:
        label = f"journal {'on' if journal else 'off'}, " + (f"{mode} {rate:.0f}/s" if rate else mode)
    print(f"[bench_broker] {label}: {args.actors} actors, {args.seconds:.0f} s", flush=True)
    batch = max(args.group_size, (args.batch // args.group_size) * args.group_size)
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    broker = subprocess.Popen(_broker_command(args, port, run_dir, journal, batch, echo), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    ctx = mp.get_context("spawn")
    ready, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs, gos = [], []
    load_cpus = set(parse_ids(args.load_cpus))
    profiler = None
    try:
        wait_for_broker(port, alive=lambda: broker.poll() is None)
        ids = [f"actor-{i}" for i in range(args.actors)]
        shards = [ids[i :: args.procs] for i in range(args.procs)]
        for k, shard in enumerate(shards):
            spec = LoadSpec(port=port, group_size=args.group_size, tokens=args.tokens,
                            prompt_tokens=args.prompt_tokens, vocab_size=VOCAB_SIZE, window=args.window,
                            rate=rate * len(shard) / args.actors)
            go = ctx.Queue()
            procs.append(ctx.Process(target=_pinned, args=(load_cpus, actor_process, spec, shard, 1000 * k, ready, go, out),
                                     daemon=True))
            gos.append(go)
        go = ctx.Queue()
        procs.append(ctx.Process(target=_pinned, args=(load_cpus, learner_process, port, batch, args.learner_ranks, ready,
                                                       go, stop, out), daemon=True))
        gos.append(go)
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        t0 = time.monotonic() + args.warmup
        t_end = t0 + args.seconds
        for go in gos:
            go.put((t0, t_end))
        time.sleep(max(0.0, t0 - time.monotonic()))
        broker_cpu0, (busy0, total0) = _cpu_seconds(broker.pid), _machine_busy()
        main_cpu0 = _cpu_seconds(broker.pid, broker.pid)  # the Python thread that runs the loop
        if args.profile:
            profiler = _start_profiler(args.profile, broker.pid, label, args.seconds)
        time.sleep(max(0.0, t_end - time.monotonic()))
        broker_cpu, (busy1, total1) = _cpu_seconds(broker.pid) - broker_cpu0, _machine_busy()
        main_cpu = _cpu_seconds(broker.pid, broker.pid) - main_cpu0
        results = [out.get(timeout=60) for _ in shards]
        stop.set()
        results.append(out.get(timeout=30))
        if broker.poll() is not None:
            raise RuntimeError(f"the broker exited: {broker.stderr.read().decode()[-2000:]}")
    except BaseException:
        if broker.poll() is not None:
            print(f"[bench_broker] broker stderr: {broker.stderr.read().decode()[-2000:]}", file=sys.stderr)
        raise
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        if profiler is not None:
            profiler.wait(30)
        broker.terminate()
        try:
            broker.wait(30)
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
    actors = [r for r in results if r["role"] == "actors"]
    learner = next(r for r in results if r["role"] == "learner")
    lat = np.concatenate([r["latencies"] for r in actors]) * 1e3
    acked = sum(r["acked"] for r in actors)
    cores = os.cpu_count() or 1
    row = {
        "label": label, "journal": None if echo else journal, "mode": mode, "offered_rollouts_per_s": rate,
        "window": args.window, "rollouts_per_s": acked / args.seconds, "messages_acked": len(lat),
        "leased_per_s": learner["leased"] / args.seconds,
        "mb_per_s": acked / args.seconds * _rollout_bytes(args) / 1e6,
        "ack_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "ack_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "ack_max_ms": float(lat.max()) if len(lat) else None,
        "broker_cpu_pct": 100 * broker_cpu / args.seconds,
        "broker_loop_cpu_pct": 100 * main_cpu / args.seconds,
        "clients_cpu_pct": 100 * sum(r["cpu_s"] for r in actors) / args.seconds,
        "learner_cpu_pct": 100 * learner["cpu_s"] / args.seconds,
        "machine_cpu_pct": 100 * cores * (busy1 - busy0) / max(total1 - total0, 1e-9),
        "broker_cpu_us_per_rollout": 1e6 * broker_cpu / acked if acked else None,
        "broker_loop_cpu_us_per_rollout": 1e6 * main_cpu / acked if acked else None,
        "retry": sum(r["retry"] for r in actors), "invalid": sum(r["invalid"] for r in actors),
        "errors": sum(r["errors"] for r in actors), "window_full": sum(r["window_full"] for r in actors),
        "first_error": next((r["first_error"] for r in [*actors, learner] if r["first_error"]), ""),
    }
    if row["first_error"]:
        print(f"[bench_broker]   error: {row['first_error']}", flush=True)
    return row


def _cpu_sets(broker: str, load: str) -> tuple[str, str]:
    """The broker's and the load's CPU lists ("" = unpinned) from the --broker-cpus/--load-cpus forms."""
    mine = sorted(available_cpus_here())
    if broker == "auto":
        broker = str(mine[-1]) if len(mine) >= 2 else ""
    broker = "" if broker == "none" else broker
    try:
        taken = set(parse_ids(broker))
        if load == "auto":
            load = format_ids([c for c in mine if c not in taken]) if taken else ""
        load = "" if load == "none" else load
        shared = taken & set(parse_ids(load))
    except ValueError as exc:
        raise SystemExit(f"--broker-cpus/--load-cpus: {exc}") from None
    if shared:
        raise SystemExit(f"--broker-cpus and --load-cpus share CPUs {sorted(shared)}")
    return broker, load


def _pinned(cpus: set[int], target, *args) -> None:
    """Run `target(*args)` in this process on `cpus` (empty: where it was started), set before
    ZeroMQ starts its I/O thread so that the thread inherits the set."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    target(*args)


def _rollout_bytes(args) -> int:
    return 4 * (args.prompt_tokens + 3 * args.tokens)


def _start_profiler(directory: str, pid: int, label: str, seconds: float) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"broker-{label.replace(', ', '-').replace(' ', '_')}.txt"
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
                             "--format", "raw", "--nonblocking", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'configuration':24} {'rollouts/s':>10} {'MB/s':>5} {'p50 ms':>7} {'p99 ms':>7} {'broker':>7} "
            f"{'(loop)':>7} {'clients':>7} {'learner':>7} {'machine':>7} {'us/rollout':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['label']:24} {r['rollouts_per_s']:>10.0f} {r['mb_per_s']:>5.0f} {_fmt(r['ack_p50_ms'], '.1f'):>7} "
            f"{_fmt(r['ack_p99_ms'], '.1f'):>7} {r['broker_cpu_pct']:>6.0f}% {r['broker_loop_cpu_pct']:>6.0f}% "
            f"{r['clients_cpu_pct']:>6.0f}% {r['learner_cpu_pct']:>6.0f}% {r['machine_cpu_pct']:>6.0f}% "
            f"{_fmt(r['broker_cpu_us_per_rollout'], '.0f'):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (3 s) for benchmarks/run_all.py")
    parser.add_argument("--actors", type=int, default=64)
    parser.add_argument("--procs", type=int, default=4, help="client processes the actors are spread over")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per configuration")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before the window opens")
    parser.add_argument("--tokens", type=int, default=1000, help="completion tokens per rollout")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per group = per SubmitRollouts")
    parser.add_argument("--window", type=int, default=2, help="messages in flight per actor")
    parser.add_argument("--rate", type=float, default=GOAL_ROLLOUTS_PER_S, help="offered rollouts/s when paced")
    parser.add_argument("--batch", type=int, default=1024, help="rollouts per learner batch")
    parser.add_argument("--learner-ranks", type=int, default=2, help="learner ranks asking for batches at once")
    parser.add_argument("--modes", default="echo,saturate,half,goal",
                        help="comma-separated: echo (bare ZeroMQ in the broker's place), saturate, half, goal")
    parser.add_argument("--inproc-rollouts", type=int, default=20_000, help="0 skips the in-process measure")
    parser.add_argument("--journal", default="on,off", help="comma-separated: on, off")
    parser.add_argument("--profile", default="", help="directory for py-spy profiles of the broker")
    parser.add_argument("--broker-cpus", default="auto",
                        help="CPU set of the broker daemon, e.g. 3; auto: the last CPU this process may use (none "
                             "with fewer than 2); none: unpinned")
    parser.add_argument("--load-cpus", default="auto",
                        help="CPU set of the client and learner processes; auto: the others; none: unpinned")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for the broker daemon, e.g. broker.journal_fsync=never")
    args = parser.parse_args(argv)
    args.broker_cpus, args.load_cpus = _cpu_sets(args.broker_cpus, args.load_cpus)
    if args.quick:
        args.seconds, args.warmup = min(args.seconds, 3.0), min(args.warmup, 1.0)
        args.inproc_rollouts = min(args.inproc_rollouts, 5_000)

    wire_stats = bench_wire(args.tokens, args.group_size, 0.5 if args.quick else 1.0)
    rows = []
    modes = args.modes.split(",")
    if "echo" in modes:
        rows.append(run_config(args, journal=False, rate=0.0, mode="echo"))
    for journal in args.journal.split(","):
        saturated = None
        for mode in modes:
            if mode == "echo":
                continue
            if mode == "half" and saturated is None:
                continue  # half of what saturate reached: needs a saturate run before it
            rate = {"saturate": 0.0, "goal": args.rate, "half": (saturated or 0.0) / 2}[mode]
            rows.append(run_config(args, journal=journal == "on", rate=rate, mode=mode))
            if mode == "saturate":
                saturated = rows[-1]["rollouts_per_s"]
    inproc = []
    if args.inproc_rollouts:
        configure_logging(component="broker", level="warning")  # as the daemon above runs
        for journal, parked in [(j, False) for j in args.journal.split(",")] + [("on", True)]:
            print(f"[bench_broker] in process, journal {journal}{', parked requests' if parked else ''}: "
                  f"{args.inproc_rollouts} rollouts", flush=True)
            inproc.append(broker_inproc.run(rollouts=args.inproc_rollouts, actors=args.actors,
                                            group_size=args.group_size, tokens=args.tokens, journal=journal == "on",
                                            vocab_size=VOCAB_SIZE, parked=parked))
    saturated_on = next((r for r in rows if r["journal"] and r["mode"] == "saturate"), None)
    head = saturated_on or rows[0]
    echo = next((r for r in rows if r["mode"] == "echo"), None)
    # The broker's share of what the transport carries on the same CPUs with the same load (only
    # with both rows: without a journal-on saturated run the head may be the echo itself).
    of_echo = (saturated_on["rollouts_per_s"] / echo["rollouts_per_s"]
               if saturated_on and echo and echo["rollouts_per_s"] else None)
    result = {
        # The headline (journal on, saturated) at the top level, where benchmarks/run_all.py reads it.
        "actors": args.actors, "tokens": args.tokens, "rollouts_per_s": head["rollouts_per_s"],
        "ack_p50_ms": head["ack_p50_ms"], "ack_p99_ms": head["ack_p99_ms"], "of_echo": of_echo,
        "broker_cpus": args.broker_cpus, "load_cpus": args.load_cpus,
        "goal": {"rollouts_per_s": GOAL_ROLLOUTS_PER_S, "p99_ms": GOAL_P99_MS, "journal": True},
        "config": {k: v for k, v in vars(args).items() if k != "profile"}, "rows": rows, "inproc": inproc,
        "wire": wire_stats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
    }
    print()
    print(f"{args.actors} actors in {args.procs} client processes, {args.group_size} rollouts of {args.tokens} "
          f"tokens per message, window {args.window} messages/actor, {args.seconds:.0f} s each; "
          f"CPU 100% = one core of {os.cpu_count()}; broker on CPUs {args.broker_cpus or 'any'}, "
          f"load on CPUs {args.load_cpus or 'any'}")
    print(format_table(rows))
    if of_echo is not None:
        print(f"broker (journal on, saturated) / bare ZeroMQ echo on the same CPUs: {of_echo:.2f}")
    for r in inproc:
        what = f"journal {'on ' if r['journal'] else 'off'}" + (", every actor's GenerationRequest parked"
                                                              if r["parked_requests"] else "")
        print(f"broker alone (in process, no sockets), {what}: {r['cpu_us_per_rollout']:.0f} us CPU per rollout "
              f"= {r['rollouts_per_cpu_s']:.0f} rollouts per CPU-second")
    print(f"codec: {wire_stats['message_bytes']} B message, encode {wire_stats['encode_msgs_per_s']:.0f} msg/s, "
          f"decode+validate {wire_stats['decode_msgs_per_s']:.0f} msg/s "
          f"({wire_stats['decode_rollouts_per_s']:.0f} rollouts/s, {wire_stats['decode_mb_per_s']:.0f} MB/s)")
    problems = [f"{r['label']}: retry {r['retry']}, invalid {r['invalid']}, errors {r['errors']}"
                for r in rows if r["retry"] or r["invalid"] or r["errors"]]
    for p in problems:
        print(f"WARNING {p}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_broker-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
