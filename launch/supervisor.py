"""Start daemons as child processes and stop every one of them, whatever happens.

Each child runs in its own session (process group), so stopping it reaches everything it spawned
too (vLLM engine cores, torchrun workers). Ctrl-C or SIGTERM to the supervisor stops all children:
SIGTERM to each group, a grace period, then SIGKILL, so no orphan survives the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tether.common.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ProcessSpec:
    """One daemon to start: its name (for logs), command line, extra environment and log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    spec: ProcessSpec
    process: subprocess.Popen
    log_file: object

    @property
    def returncode(self) -> int | None:
        return self.process.poll()


class Supervisor:
    """Owns a set of child process groups; use as a context manager so they are always stopped."""

    def __init__(self, grace_seconds: float = 10.0) -> None:
        self.grace_seconds = grace_seconds
        self.children: list[Child] = []
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> Supervisor:
        # Turn SIGTERM into KeyboardInterrupt so one code path (the finally below) stops everything.
        self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop_all()
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)

    def start(self, spec: ProcessSpec) -> Child:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(spec.log_path, "ab")  # noqa: SIM115 - closed in stop_all
        process = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child = Child(spec=spec, process=process, log_file=log_file)
        self.children.append(child)
        log.info("started", process=spec.name, pid=process.pid, log=str(spec.log_path))
        return child

    def failed(self) -> list[Child]:
        """Children that exited with a non-zero code."""
        return [c for c in self.children if c.returncode not in (None, 0)]

    def stop(self, child: Child) -> int | None:
        """SIGTERM the child's process group, wait up to the grace period, then SIGKILL it."""
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

    def stop_all(self) -> None:
        """Stop children in reverse start order (learner and actors before the broker)."""
        for child in reversed(self.children):
            if not child.log_file.closed:
                code = self.stop(child)
                log.info("stopped", process=child.spec.name, returncode=code)

    def wait_any(self, poll_seconds: float = 0.5) -> Child:
        """Block until some child exits; return it."""
        while True:
            for child in self.children:
                if child.returncode is not None:
                    return child
            time.sleep(poll_seconds)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
