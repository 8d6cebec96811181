"""Start daemons as child processes, restart the ones that may be restarted, and stop every one.

Each child runs in its own session (process group), so stopping it reaches everything it spawned
too (vLLM engine cores, torchrun workers). Ctrl-C or SIGTERM to the supervisor stops all children:
SIGTERM to each group, a grace period, then SIGKILL, so no orphan survives the run. If the
supervisor itself is killed (kill -9), each child gets SIGTERM from the kernel (parent-death
signal) and takes its group down the same way.

A child started with `restarts > 0` is started again when it exits with an error (a crashed actor
comes back with clean weights, a crashed broker replays its journal); `check()` does that and
reports the children that failed for good.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tether.common.logging import get_logger
from tether.common.process import die_with_parent

log = get_logger(__name__)


@dataclass(frozen=True)
class ProcessSpec:
    """One daemon to start: its name (for logs), command line, extra environment and log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    """How many times to start it again after it exits with an error."""


@dataclass
class Child:
    spec: ProcessSpec
    process: subprocess.Popen
    log_file: object
    restarts_left: int = 0
    stopped: bool = False

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


class Supervisor:
    """Owns a set of child process groups; use as a context manager so they are always stopped."""

    def __init__(self, grace_seconds: float = 10.0) -> None:
        self.grace_seconds = grace_seconds
        self.children: list[Child] = []
        self.restarts = 0
        """Restarts performed so far."""
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> Supervisor:
        # Turn SIGTERM into KeyboardInterrupt so one code path (the finally below) stops everything.
        # SIGINT too, explicitly: a process started in the background by a non-interactive shell
        # (`tether demo ... &` in a script) inherits SIGINT ignored, and Python then installs no
        # handler, so `kill -INT` (what Ctrl-C sends) would be lost while the daemons run on.
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, _raise_keyboard_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop_all()
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)

    def start(self, spec: ProcessSpec) -> Child:
        child = Child(spec=spec, process=None, log_file=None, restarts_left=spec.restarts)  # type: ignore[arg-type]
        self._launch(child)
        self.children.append(child)
        return child

    def _launch(self, child: Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        child.log_file = open(spec.log_path, "ab")  # noqa: SIM115 - closed in stop()
        child.process = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=child.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),
        )
        log.info("started", process=spec.name, pid=child.process.pid, log=str(spec.log_path))

    def check(self) -> list[Child]:
        """Restart children that failed and may be restarted; return those that failed for good."""
        failed = []
        for child in self.children:
            code = child.returncode
            if code in (None, 0) or child.stopped:
                continue
            if child.restarts_left > 0:
                child.restarts_left -= 1
                self.restarts += 1
                log.warning("restarting a failed daemon", process=child.spec.name, returncode=code,
                            restarts_left=child.restarts_left, log=str(child.spec.log_path))
                _signal_group(child.process.pid, signal.SIGKILL)  # whatever it left running
                child.log_file.close()
                self._launch(child)
            else:
                failed.append(child)
        return failed

    def failed(self) -> list[Child]:
        """Children that exited with a non-zero code (restartable ones included, until restarted)."""
        return [c for c in self.children if c.returncode not in (None, 0) and not c.stopped]

    def wait_for(self, child: Child, timeout: float, poll_seconds: float = 0.5) -> bool:
        """Wait until `child` exits (True) or `timeout` passes (False), restarting others as allowed.

        Raises RuntimeError naming the daemon when another child fails for good.
        """
        deadline = time.monotonic() + timeout
        while child.returncode is None:
            failed = [c for c in self.check() if c is not child]
            if failed:
                raise RuntimeError(f"{failed[0].spec.name} exited with {failed[0].returncode}; "
                                   f"see {failed[0].spec.log_path}")
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_seconds)
        return True

    def stop(self, child: Child) -> int | None:
        """SIGTERM the child's process group, wait up to the grace period, then SIGKILL it."""
        child.stopped = True
        if child.returncode is None:
            _signal_group(child.process.pid, signal.SIGTERM)
            try:
                child.process.wait(timeout=self.grace_seconds)
            except subprocess.TimeoutExpired:
                log.warning("did not stop in time; killing", process=child.spec.name, pid=child.process.pid)
        # Whatever the leader did, nothing of its group may outlive it.
        _signal_group(child.process.pid, signal.SIGKILL)
        if child.returncode is None:
            child.process.wait(timeout=self.grace_seconds)
        child.log_file.close()
        return child.returncode

    def kill(self, child: Child, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to the child's whole process group (chaos tests; it may be restarted)."""
        _signal_group(child.process.pid, signum)

    def stop_all(self) -> None:
        """Stop children in reverse start order (learner and actors before the broker)."""
        for child in reversed(self.children):
            if not child.log_file.closed:
                code = self.stop(child)
                log.info("stopped", process=child.spec.name, returncode=code)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
