"""Who is connected: registration, liveness and roles.

A peer registers with Hello and stays alive while it sends anything at least every
`peer_timeout_s`. A silent peer is declared dead (it must send Hello again); dead peers stay
visible in `tether status` for a while, then are forgotten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tether.common.messages import Hello

# Dead peers stay visible in `tether status` for this many peer timeouts, then are forgotten.
DEAD_PEER_RETENTION = 6


class RegistrationRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Peer:
    peer_id: str
    role: str
    rank: int
    incarnation: str
    session: str
    identity: bytes
    """Transport identity of its connection (where replies go)."""
    credential: str | None
    """CURVE public key it authenticated with (None without CURVE)."""
    worker_count: int
    host: str
    pid: int
    last_seen: float
    alive: bool = True


class Membership:
    def __init__(self, *, peer_timeout_s: float, max_peers: int, clock: Callable[[], float]) -> None:
        self.peer_timeout_s = peer_timeout_s
        self.max_peers = max_peers
        self.clock = clock
        self.peers: dict[str, Peer] = {}

    def register(self, hello: Hello, identity: bytes, credential: str | None) -> tuple[Peer, str]:
        """Register (again); returns the peer and what happened: joined, restarted, came back or
        re-registered (the same process after a broker restart or a lost connection)."""
        old = self.peers.get(hello.peer_id)
        if old is None and len(self.peers) >= self.max_peers:
            raise RegistrationRefused("rejected", f"the broker already has {self.max_peers} peers")
        if old is not None and old.credential != credential and old.alive:
            raise RegistrationRefused("forbidden", f"peer id {hello.peer_id!r} is registered with another key")
        if old is None:
            event = "joined"
        elif old.incarnation != hello.incarnation:
            event = "restarted"
        elif not old.alive:
            event = "came back"
        else:
            event = "re-registered"
        peer = Peer(
            peer_id=hello.peer_id, role=hello.role, rank=hello.rank, incarnation=hello.incarnation,
            session=hello.session, identity=identity, credential=credential,
            worker_count=hello.worker_count if hello.role == "actor" else 0,
            host=hello.host, pid=hello.pid, last_seen=self.clock(),
        )
        self.peers[hello.peer_id] = peer
        return peer, event

    def alive(self, peer_id: str) -> Peer | None:
        peer = self.peers.get(peer_id)
        return peer if peer is not None and peer.alive else None

    def touch(self, peer: Peer, identity: bytes) -> None:
        peer.identity = identity
        peer.last_seen = self.clock()

    def expire(self) -> list[Peer]:
        """Declare silent peers dead (returned) and forget long-dead ones."""
        now = self.clock()
        died = []
        for peer in list(self.peers.values()):
            silent = now - peer.last_seen
            if peer.alive and silent > self.peer_timeout_s:
                peer.alive = False
                died.append(peer)
            elif not peer.alive and silent > DEAD_PEER_RETENTION * self.peer_timeout_s:
                del self.peers[peer.peer_id]
        return died

    def next_deadline(self) -> float | None:
        times = [p.last_seen + self.peer_timeout_s for p in self.peers.values() if p.alive]
        return min(times, default=None)

    def actors(self) -> list[Peer]:
        """Alive actors, by peer id."""
        return sorted((p for p in self.peers.values() if p.role == "actor" and p.alive), key=lambda p: p.peer_id)

    def learner(self, rank: int = 0) -> Peer | None:
        """The alive learner rank `rank` (of the newest session when ranks of several are known)."""
        ranks = [p for p in self.peers.values() if p.role == "learner" and p.alive and p.rank == rank]
        return max(ranks, key=lambda p: p.last_seen, default=None)
