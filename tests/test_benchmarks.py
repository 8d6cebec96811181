"""`make bench`'s table reads what the benchmarks write (their JSON shapes, not their timings); the broker
benchmark also runs for a second against the real daemon."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

import pytest

from benchmarks import bench_broker
from benchmarks.bench_race import report
from benchmarks.run_all import table_rows
from tether.common.config.placement import parse_ids
from tether.launch.chaos import Audit, ChaosReport, FaultResult
from tether.launch.placement import format_ids


def _race_row(mode: str, seed: int, reward_s: float | None, step_s: float) -> dict:
    return {"mode": mode, "seed": seed, "steps": 60, "clock_s": 60 * step_s, "time_to_reward_s": reward_s,
            "time_to_accuracy_s": None if reward_s is None else reward_s + 10, "accuracy_curve": [],
            "final_trailing_reward": 0.7, "step_s_median": step_s, "learner_compute_s_median": 1.0,
            "learner_wait_s_median": step_s - 1.0, "dropped": 2, "received": 100}


def _row(rows, benchmark: str, metric_start: str) -> tuple:
    return next(r for r in rows if r[0] == benchmark and r[1].startswith(metric_start))


def test_race_rows_are_ratios_of_medians_over_seeds():
    args = argparse.Namespace(reward_target=0.6, accuracy_target=0.6, actor_cpus="0", learner_cpus="1")
    rows = [_race_row("inflight", s, t, 1.5) for s, t in ((0, 30.0), (1, 40.0), (2, 50.0))]
    rows += [_race_row("stop_the_world", s, t, 2.5) for s, t in ((0, 80.0), (1, 100.0), (2, 90.0))]
    table = table_rows({"race": {"ok": True, "json": report(rows, args)}})
    reward = _row(table, "race", "in-flight / stop-the-world, time to reward")
    assert reward[2] == "0.444" and "40.0 vs 90.0 s, median of 3 seeds" in reward[3]
    assert _row(table, "race", "in-flight / stop-the-world, step time")[2] == "0.6"
    assert _row(table, "race", "  in-flight rollouts dropped stale")[2] == "0.02"


def test_a_seed_that_misses_the_target_gives_no_ratio():
    args = argparse.Namespace(reward_target=0.6, accuracy_target=0.6, actor_cpus="0", learner_cpus="1")
    rows = [_race_row("inflight", 0, 30.0, 1.5), _race_row("inflight", 1, None, 1.5),
            _race_row("stop_the_world", 0, 80.0, 2.5), _race_row("stop_the_world", 1, 90.0, 2.5)]
    table = table_rows({"race": {"ok": True, "json": report(rows, args)}})
    assert _row(table, "race", "in-flight / stop-the-world, time to reward")[2] == "n/a"


def test_chaos_rows_carry_the_audit_and_failed_benchmarks_say_so():
    chaos = ChaosReport(steps=40, wall_s=240.0, books_balance=True,
                        faults=[FaultResult("kill -9 broker", at_step=12, recovery_s=4.4)],
                        audit=Audit(acked=100, trained=90, trained_twice=0, dropped=8, buffered=2, lost=0,
                                    unexplained=0))
    table = table_rows({"chaos": {"ok": True, "json": asdict(chaos)},
                        "broker": {"ok": False, "error": "exit 1: boom"}})
    assert _row(table, "chaos", "recovery s, kill -9 broker")[2] == "4.4"
    assert _row(table, "chaos", "acked rollouts lost / trained twice")[2] == "0 / 0"
    assert _row(table, "broker", "rollouts/s")[2:] == ("failed", "exit 1: boom")
    assert _row(table, "actor", "tokens/s")[2] == "skipped"


@pytest.mark.slow
def test_broker_benchmark_runs_the_broker_and_the_bare_transport_on_their_own_cpus(tmp_path, monkeypatch):
    """A short bench_broker run against the real daemon and the echo stand-in: both answer every
    message the load sends, and the broker's share of the echo's rate is reported."""
    monkeypatch.setattr(bench_broker, "RESULTS", tmp_path)
    cpus = sorted(os.sched_getaffinity(0))
    placement = ["--broker-cpus", str(cpus[-1]), "--load-cpus", format_ids(cpus[:-1])] if len(cpus) > 1 else []
    assert bench_broker.main(["--actors", "4", "--procs", "1", "--seconds", "1", "--warmup", "0.5", "--tokens", "64",
                              "--batch", "16", "--learner-ranks", "1", "--modes", "echo,saturate", "--journal", "on",
                              "--inproc-rollouts", "0", *placement]) == 0
    result = json.loads(next(tmp_path.glob("bench_broker-*.json")).read_text())
    echo, broker = result["rows"]
    assert echo["mode"] == "echo" and broker["journal"] is True
    for row in (echo, broker):
        assert row["rollouts_per_s"] > 0 and row["errors"] == 0 and row["invalid"] == 0, row
    assert broker["leased_per_s"] > 0  # the real broker served the learner; the echo serves nobody
    assert result["of_echo"] == pytest.approx(broker["rollouts_per_s"] / echo["rollouts_per_s"])
    table = table_rows({"broker": {"ok": True, "json": result}})
    assert _row(table, "broker", "broker / bare ZeroMQ echo")[2] == f"{result['of_echo']:.2f}"


@pytest.mark.slow
def test_an_echo_only_broker_benchmark_reports_no_broker_share(tmp_path, monkeypatch):
    """Without a broker row to compare, the echo is the headline row but not a share of itself."""
    monkeypatch.setattr(bench_broker, "RESULTS", tmp_path)
    assert bench_broker.main(["--actors", "2", "--procs", "1", "--seconds", "0.5", "--warmup", "0.2", "--tokens", "16",
                              "--modes", "echo", "--inproc-rollouts", "0", "--broker-cpus", "none"]) == 0
    result = json.loads(next(tmp_path.glob("bench_broker-*.json")).read_text())
    assert [r["mode"] for r in result["rows"]] == ["echo"] and result["rollouts_per_s"] > 0
    assert result["of_echo"] is None and (result["broker_cpus"], result["load_cpus"]) == ("", "")


def test_broker_benchmark_cpu_sets():
    cpus = sorted(os.sched_getaffinity(0))
    broker, load = bench_broker._cpu_sets("auto", "auto")
    if len(cpus) >= 2:
        assert broker == str(cpus[-1]) and parse_ids(load) == cpus[:-1]
    else:
        assert (broker, load) == ("", "")
    assert bench_broker._cpu_sets("none", "none") == ("", "")
    assert bench_broker._cpu_sets("none", "auto") == ("", "")  # unpinned broker: the load is not pinned either
    with pytest.raises(SystemExit, match="'x' is not an id"):
        bench_broker._cpu_sets("x", "auto")
    assert bench_broker._cpu_sets("3", "0-2") == ("3", "0-2")
    with pytest.raises(SystemExit, match="share CPUs"):
        bench_broker._cpu_sets("1", "0-1")
