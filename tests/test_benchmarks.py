"""`make bench`'s table reads what the benchmarks write (their JSON shapes, not their timings)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from benchmarks.bench_race import report
from benchmarks.run_all import table_rows
from tether.launch.chaos import Audit, ChaosReport, FaultResult


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
