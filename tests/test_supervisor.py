"""The supervisor stops every child and grandchild (on normal exit, SIGTERM, or its own kill -9)
and restarts the daemons allowed to restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tether.launch.supervisor import ProcessSpec, Supervisor

# A child that spawns a grandchild which ignores SIGTERM, and reports both pids.
SPAWNER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print("pids", grandchild.pid, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _dies_soon(pid: int, within_s: float = 10.0) -> bool:
    # SIGKILL is delivered asynchronously; give the kernel a moment before judging.
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _grandchild_pid(log_path: Path) -> int:
    for _ in range(200):
        if log_path.exists() and "pids" in log_path.read_text():
            return int(log_path.read_text().split()[1])
        time.sleep(0.05)
    raise AssertionError(f"spawner never reported: {log_path.read_text() if log_path.exists() else ''}")


def test_stop_all_leaves_no_orphans(tmp_path):
    with Supervisor(grace_seconds=1.0) as supervisor:
        child = supervisor.start(ProcessSpec("spawner", [sys.executable, "-c", SPAWNER], tmp_path / "spawner.log"))
        quick = supervisor.start(ProcessSpec("quick", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "q.log"))
        grandchild = _grandchild_pid(tmp_path / "spawner.log")
        assert supervisor.wait_for(quick, timeout=30)
        assert supervisor.failed() == [quick] and quick.returncode == 3 and supervisor.check() == [quick]
    assert _dies_soon(child.process.pid)
    assert _dies_soon(grandchild), "a grandchild that ignores SIGTERM survived"


def test_sigterm_to_the_supervisor_stops_children(tmp_path):
    driver = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from tether.launch.supervisor import ProcessSpec, Supervisor
        with Supervisor(grace_seconds=1.0) as s:
            s.start(ProcessSpec("spawner", [sys.executable, "-c", {SPAWNER!r}], Path({str(tmp_path / 'c.log')!r})))
            print("ready", flush=True)
            s.wait_for(s.children[0], timeout=600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    assert any(line.strip() == "ready" for line in proc.stdout), "driver never became ready"
    grandchild = _grandchild_pid(tmp_path / "c.log")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert _dies_soon(grandchild)
    assert os.path.exists(tmp_path / "c.log")


def test_sigint_stops_children_even_when_started_with_sigint_ignored(tmp_path):
    """A job a script starts in the background inherits SIGINT ignored (Python then installs no handler);
    `kill -INT`, what Ctrl-C sends, must still stop the supervisor and everything it started."""
    driver = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from tether.launch.supervisor import ProcessSpec, Supervisor
        try:
            with Supervisor(grace_seconds=1.0) as s:
                s.start(ProcessSpec("spawner", [sys.executable, "-c", {SPAWNER!r}], Path({str(tmp_path / 'c.log')!r})))
                print("ready", flush=True)
                s.wait_for(s.children[0], timeout=600)
        except KeyboardInterrupt:
            raise SystemExit(130)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert any(line.strip() == "ready" for line in proc.stdout), "driver never became ready"
    grandchild = _grandchild_pid(tmp_path / "c.log")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert _dies_soon(grandchild)


def test_a_failing_daemon_is_restarted_up_to_its_limit_then_reported(tmp_path):
    counter = tmp_path / "starts"
    script = f"from pathlib import Path; p = Path({str(counter)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x'); raise SystemExit(7)"
    with Supervisor(grace_seconds=1.0) as supervisor:
        flaky = supervisor.start(ProcessSpec("flaky", [sys.executable, "-c", script], tmp_path / "f.log", restarts=2))
        deadline = time.monotonic() + 30
        while not supervisor.check():
            assert time.monotonic() < deadline, "never reported as failed"
            time.sleep(0.1)
        assert supervisor.check() == [flaky] and flaky.returncode == 7
    assert counter.read_text() == "xxx" and supervisor.restarts == 2  # started once, restarted twice


def test_children_die_when_the_supervisor_is_killed(tmp_path):
    driver = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from tether.launch.supervisor import ProcessSpec, Supervisor
        s = Supervisor()
        child = s.start(ProcessSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
                                    Path({str(tmp_path / 's.log')!r})))
        print("pid", child.process.pid, flush=True)
        s.wait_for(child, timeout=600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    child_pid = next(int(line.split()[1]) for line in proc.stdout if line.startswith("pid "))
    assert _alive(child_pid)
    proc.kill()  # kill -9: no cleanup code runs in the supervisor
    proc.wait(timeout=30)
    assert _dies_soon(child_pid), "a daemon outlived its killed supervisor"
