"""tether.launch.node_actors (the Slurm actor step's task): an actor that dies takes the step down.

The actors here cannot reach their broker's keys (CURVE on, no key files), so each exits with an
error right after start-up, before any engine is built: node_actors must say which actor exited,
stop the others and exit 1, so that the Slurm job watching the step fails at once. The GPU shares it
hands out come from the CUDA_VISIBLE_DEVICES it inherited, as Slurm set it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_a_dead_actor_stops_the_node_and_fails_the_step(tmp_path):
    from tether.common.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model", seed=0, warm_start=False).out_dir
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tether.launch.node_actors", "--count", "2", "--grace", "5",
         f"run.dir={tmp_path / 'run'}", f"model.path={model}", "broker.curve_enabled=true",
         f"broker.keys_dir={tmp_path / 'no-keys'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "6,7"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "CUDA_VISIBLE_DEVICES=6 " in out and "CUDA_VISIBLE_DEVICES=7 " in out  # shares of what it was given
    assert "exited with status 1 on its own; stopping this node's other actors" in out, out
    assert time.monotonic() - started < 120
    logs = sorted((tmp_path / "run" / "logs").glob("actor-*.out"))
    assert len(logs) == 2 and any("no-keys" in log.read_text() for log in logs)
