"""Network facts of this host for launchers: free TCP ports, and an address other hosts can reach.

    python -m tether.launch.hostnet ports N        # N distinct free TCP ports, one line
    python -m tether.launch.hostnet address [NAME] # this host's routable IPv4 address

A fixed port collides with another job or a demo on the same host; ports asked from the kernel
(bound all at once, so distinct, then released) do not, short of a race within milliseconds. A node
name is not always a usable address: Debian maps the host's own name to 127.0.1.1, which binds fine
and cuts off every remote peer. `routable_address` keeps a name that resolves to a non-loopback
address and otherwise takes the address of the interface that routes off the host.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

__all__ = ["free_ports", "routable_address"]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on all interfaces a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


def _resolve(name: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)})
    except OSError:
        return []


def _outward_address() -> str | None:
    """The source address the kernel picks for traffic leaving the host (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.254.254.254", 9))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if _is_loopback(address) or address == "0.0.0.0" else address


def routable_address(name: str | None = None) -> str:
    """An IPv4 address of this host for peers on other hosts: `name` (e.g. Slurm's NodeAddr, default
    this host's name) when it resolves to a non-loopback address, else the outward interface's address,
    else 127.0.0.1 (a host without a network: every peer is local)."""
    for address in _resolve(name or socket.gethostname()):
        if not _is_loopback(address):
            return address
    return _outward_address() or "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "ports" and argv[1].isdigit():
        print(" ".join(map(str, free_ports(int(argv[1])))))
        return 0
    if argv[:1] == ["address"] and len(argv) <= 2:
        print(routable_address(argv[1] if len(argv) == 2 else None))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
