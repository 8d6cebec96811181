"""Process lifetime helpers shared by the daemons and the launchers."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies (Linux only).

    torchrun starts each learner rank in its own process session, so killing torchrun alone (kill
    -9, or a job step torn down) would otherwise leave the ranks training as orphans. Returns whether
    the request took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signum)
    return True


def exit_now(code: int) -> None:
    """Flush stdout and stderr and end the process without the interpreter's teardown.

    For a one-shot command whose results are already written: the final garbage collection walks
    vLLM's and torch's whole object graph (10 s and more on a loaded machine) to free memory that the
    exit frees anyway. Only for a process that has closed what it opened (files, engines); log
    handlers are flushed and closed here.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


@contextlib.contextmanager
def environment_set(name: str, value: str | None, *, keep_existing: bool) -> Iterator[None]:
    """`name` set to `value` while the block runs, restored (or removed) after it.

    For a library switch read from the environment when something is built (vLLM's engine, a NCCL
    process group): the setting should not outlive that construction. `keep_existing`: a value the
    user already set wins (the block runs with it); otherwise ours replaces it for the block.
    `value` None changes nothing.
    """
    previous = os.environ.get(name)
    if value is None or (keep_existing and previous is not None):
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
