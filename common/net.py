"""Network helpers shared by launch scripts, benchmarks and tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that the OS reported free a moment ago.

    The socket is closed before the port is returned, so another process may take the port before
    the caller binds it; use it where a clash is unlikely and fails loudly (tests, local runs).
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
