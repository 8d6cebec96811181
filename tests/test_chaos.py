"""Chaos in CI: a real run on the tiny model survives what clusters do to it, and the books prove
exactly-once delivery at the level of rollout ids (launch/chaos.py has the scenario and the audit).

In one run: the only actor is killed with -9 and replaced while a second actor joins late, an actor
is stopped past the peer timeout and continued, the broker is killed with -9 and restarted on its
journal, and the learner is killed with -9 between checkpoints and resumed. The run must reach its
last step; every acked rollout must have been received by exactly one step of the final model's
lineage or counted as dropped (or still be buffered), and nothing may outlive the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tether.launch.chaos import run_chaos

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def test_a_run_survives_kills_of_every_daemon_with_exactly_once_books(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "chaos"
    report = run_chaos(run_dir, str(tiny_model_dir), steps_after=6, timeout=1200)
    print("\n" + report.table())
    faults = {f.fault: f for f in report.faults}
    assert set(faults) == {"actor killed -9, replaced", "actor joins late", "actor stopped past the timeout",
                           "broker killed -9, restarted", "learner killed -9, resumed"}
    # The learner came back from its newest checkpoint and retrained only the steps after it.
    learner = faults["learner killed -9, resumed"]
    assert 0 < learner.steps_lost < 5
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, report.steps + 1))  # no step logged twice, none missing
    audit = report.audit
    assert audit is not None and audit.acked > 0 and audit.trained > 0
    assert (audit.lost, audit.trained_twice, audit.unexplained) == (0, 0, 0)
    assert audit.acked == audit.trained + audit.dropped + audit.buffered
    assert report.books_balance
    # Killing torchrun with -9 must not leave its ranks training as orphans; nothing outlives the run.
    assert _processes_mentioning(str(run_dir)) == []
