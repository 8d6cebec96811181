"""`tether demo --resume`, as a user runs it: Ctrl-C a demo in the middle, then resume the run.

The resumed run starts a fresh broker on the same journal, a fresh actor at version 0 and a learner
from the newest checkpoint; it must publish the checkpoint's version before its first step (else every
rollout is stale and the learner waits forever), train to the last step without logging a step twice,
and the books must show every acked rollout trained on exactly once or dropped stale.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tether.common.net import free_port

pytestmark = pytest.mark.slow

STEPS = 20  # with the learner on a core of its own a step takes about a second: room to interrupt it
CHECKPOINT_EVERY = 2


def _demo_command(run_dir: Path, model_dir: Path, ports: tuple[int, int], *extra: str) -> list[str]:
    return [sys.executable, "-m", "tether.common.cli", "demo", "--run-dir", str(run_dir), "--actors", "1",
            "--learner-ranks", "1", "--no-eval", *extra, f"model.path={model_dir}", f"learner.steps={STEPS}",
            f"broker.port={ports[0]}", f"broker.store_port={ports[1]}",  # another run may hold the defaults
            "learner.rollouts_per_step=32", "learner.micro_batch_size=32", "run.keep_rollouts=false",
            f"learner.checkpoint_interval={CHECKPOINT_EVERY}", f"learner.keep_checkpoint_every={CHECKPOINT_EVERY}",
            "broker.journal_compact_every=-1"]  # the whole history, for the audit


def _steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _daemons_of(run_dir: Path) -> list[str]:
    """Command lines of live processes that name `run_dir` (its daemons use its config)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or gone meanwhile
            continue
        if "tether." in cmdline and str(run_dir) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def test_ctrl_c_then_resume_finishes_the_run_exactly_once(tmp_path, tiny_model_dir):
    from tether.launch.chaos import audit

    run_dir = tmp_path / "run"
    ports = (free_port(), free_port())
    first = subprocess.Popen(_demo_command(run_dir, tiny_model_dir, ports), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not any(s > CHECKPOINT_EVERY for s in _steps_logged(run_dir)):  # past the first checkpoint
        assert first.poll() is None, f"the first demo ended early:\n{first.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "the first demo made no progress"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
    console, _ = first.communicate(timeout=120)
    assert first.returncode == 130, console[-3000:]
    assert "interrupted" in console
    interrupted_at = max(_steps_logged(run_dir))
    assert interrupted_at < STEPS
    assert not _daemons_of(run_dir)  # no orphans

    resumed = subprocess.run(_demo_command(run_dir, tiny_model_dir, ports, "--resume"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=900, check=False)
    console = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, console[-4000:]
    steps = _steps_logged(run_dir)
    assert steps == list(range(1, STEPS + 1)), steps  # continued from the checkpoint; no step logged twice
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resumed_from = max(s for s in range(0, interrupted_at + 1, CHECKPOINT_EVERY))
    first_resumed = records[resumed_from]  # step resumed_from + 1, trained after the resume
    # the resumed learner published its checkpoint's version before its first step, so it trained on
    # rollouts of that version, not on version-0 rollouts that would all be stale
    assert first_resumed["samples"] > 0 and first_resumed["version"] == resumed_from + 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS

    books = audit(run_dir, run_dir / "broker" / "journal.bin")
    assert books.exactly_once, books
    assert books.acked >= STEPS * 32 and books.trained > 0
