"""Byte transports between the broker and its peers: one interface, two implementations.

The coordination code (broker state, BrokerConnection) only sees these interfaces:

- `ClientTransport`: one peer's connection to the broker; send bytes, receive bytes with a timeout.
- `ServerTransport`: the broker's side; receives `Received(peer, data, credential)` where `peer` is
  an opaque identity of the connection and `credential` the CURVE public key the connection
  authenticated with (None without CURVE), and sends bytes back to a given peer.

Implementations:

- ZeroMQ (`ZmqServerTransport` = ROUTER, `ZmqClientTransport` = DEALER), with optional CURVE.
- In-process (`InProcHub`), built on bounded queues, so coordination logic is testable without sockets.

Both implementations never block a sender on a slow receiver: a full queue drops the message and
`send` returns False. Reliability lives one layer up (acks and resends), which is what keeps one slow
or hostile peer from stalling the broker for everyone else.
"""

from __future__ import annotations

import itertools
import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import zmq

DEFAULT_HWM = 1000


class TransportClosed(Exception):
    """The transport was closed."""


@dataclass(frozen=True)
class Received:
    """One message the broker received."""

    peer: bytes
    """Identity of the connection (where replies go)."""
    data: bytes | None
    """The message, or None when the peer sent something that is not exactly one frame."""
    credential: str | None = None
    """The Z85 CURVE public key the connection authenticated with (None without CURVE)."""


class ClientTransport(ABC):
    """A peer's connection to the broker. Not thread-safe: use from one thread at a time."""

    @abstractmethod
    def send(self, data: bytes) -> bool:
        """Queue `data` for the broker without blocking; False if it was dropped (queue full)."""

    @abstractmethod
    def recv(self, timeout: float) -> bytes | None:
        """The next message from the broker, or None after `timeout` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; further use raises TransportClosed."""


class ServerTransport(ABC):
    """The broker's side: sees every peer's connection identity. Not thread-safe."""

    @abstractmethod
    def send(self, peer: bytes, data: bytes) -> bool:
        """Send `data` to `peer` without blocking; False if it was dropped (peer gone or queue full)."""

    @abstractmethod
    def recv(self, timeout: float) -> Received | None:
        """The next message, or None after `timeout` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving."""


# --------------------------------------------------------------------------------------------
# CURVE keys


@dataclass(frozen=True)
class CurveServerKeys:
    """The broker's key pair plus the roles each authorized client public key may take."""

    public: bytes
    secret: bytes
    key_roles: dict[str, frozenset[str]]
    """Z85 public key -> roles (actor, learner, tool) it may register as."""


@dataclass(frozen=True)
class CurveClientKeys:
    """A client's key pair plus the broker's public key it expects."""

    public: bytes
    secret: bytes
    server_public: bytes


ROLES = ("actor", "learner", "tool")


def load_server_keys(keys_dir: str | Path) -> CurveServerKeys:
    """Read `<keys_dir>/server.key_secret` and `<keys_dir>/authorized/<role>/*.key` (layout of
    `tether keys`): a key in authorized/actor/ may register only as an actor, and so on."""
    import zmq.auth

    keys_dir = Path(keys_dir)
    public, secret = zmq.auth.load_certificate(keys_dir / "server.key_secret")
    authorized = keys_dir / "authorized"
    if not authorized.is_dir():
        raise FileNotFoundError(f"{authorized} does not exist; create keys with `tether keys {keys_dir}`")
    roles: dict[str, set[str]] = {}
    for role in ROLES:
        for path in sorted((authorized / role).glob("*.key")):
            key, _ = zmq.auth.load_certificate(path)
            roles.setdefault(key.decode("ascii"), set()).add(role)
    return CurveServerKeys(public=public, secret=secret, key_roles={k: frozenset(v) for k, v in roles.items()})


def load_client_keys(keys_dir: str | Path, name: str) -> CurveClientKeys:
    """Read `<keys_dir>/clients/<name>.key_secret` and `<keys_dir>/server.key`."""
    import zmq.auth

    keys_dir = Path(keys_dir)
    public, secret = zmq.auth.load_certificate(keys_dir / "clients" / f"{name}.key_secret")
    server_public, _ = zmq.auth.load_certificate(keys_dir / "server.key")
    return CurveClientKeys(public=public, secret=secret, server_public=server_public)


# --------------------------------------------------------------------------------------------
# ZeroMQ


class ZmqServerTransport(ServerTransport):
    """A ROUTER socket bound at `endpoint` (e.g. "tcp://127.0.0.1:5555").

    `max_message_bytes` sets ZMQ_MAXMSGSIZE: a peer sending a larger frame is disconnected by
    libzmq before the frame is ever buffered. With `curve`, a ZAP authenticator thread admits only
    clients whose public key is in `curve.authorized_dir`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        max_message_bytes: int = -1,
        hwm: int = DEFAULT_HWM,
        curve: CurveServerKeys | None = None,
    ) -> None:
        self._ctx = zmq.Context()
        self._auth = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_KeyProvider(curve.key_roles))
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        # A newer connection with the same routing id takes over the old one (peer restarted).
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if max_message_bytes > 0:
            self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if curve is not None:
            self._sock.curve_server = True
            self._sock.curve_publickey = curve.public
            self._sock.curve_secretkey = curve.secret
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._closed = False

    def send(self, peer: bytes, data: bytes) -> bool:
        if self._closed:
            raise TransportClosed("server transport is closed")
        try:
            # ROUTER drops (never blocks) on a full or unknown peer without ROUTER_MANDATORY.
            self._sock.send_multipart([peer, data], flags=zmq.NOBLOCK, copy=len(data) < 65536)
            return True
        except zmq.Again:
            return False

    def recv(self, timeout: float) -> Received | None:
        if self._closed:
            raise TransportClosed("server transport is closed")
        if not self._sock.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            return None
        frames = self._sock.recv_multipart(copy=False)
        peer = frames[0].bytes
        credential = None
        if self._auth is not None:
            credential = frames[-1].get("User-Id") or None
        if len(frames) != 2:
            return Received(peer, None, credential)
        return Received(peer, frames[1].bytes, credential)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()


class ZmqClientTransport(ClientTransport):
    """A DEALER socket connected to the broker; libzmq reconnects by itself after a broker restart."""

    def __init__(
        self,
        endpoint: str,
        *,
        max_message_bytes: int = -1,
        hwm: int = DEFAULT_HWM,
        curve: CurveClientKeys | None = None,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 2000,
    ) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
        if max_message_bytes > 0:
            self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if curve is not None:
            self._sock.curve_serverkey = curve.server_public
            self._sock.curve_publickey = curve.public
            self._sock.curve_secretkey = curve.secret
        self._sock.connect(endpoint)
        self._closed = False

    def send(self, data: bytes) -> bool:
        if self._closed:
            raise TransportClosed("client transport is closed")
        try:
            self._sock.send(data, flags=zmq.NOBLOCK, copy=len(data) < 65536)
            return True
        except zmq.Again:
            return False

    def recv(self, timeout: float) -> bytes | None:
        if self._closed:
            raise TransportClosed("client transport is closed")
        if not self._sock.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            return None
        frames = self._sock.recv_multipart(copy=True)
        # The broker only ever sends single frames; anything else is not ours to interpret.
        return frames[0] if len(frames) == 1 else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        self._ctx.term()


class _KeyProvider:
    """ZAP credentials callback: admit a CURVE client whose public key holds some role."""

    def __init__(self, key_roles: dict[str, frozenset[str]]) -> None:
        self._keys = frozenset(key_roles)

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii") in self._keys


# --------------------------------------------------------------------------------------------
# In-process


class InProcHub:
    """An in-process 'network': one server and any number of clients, joined by bounded queues.

    Use `hub.server()` once and `hub.client()` per peer. Identities are b"inproc-<n>".
    """

    def __init__(self, hwm: int = DEFAULT_HWM) -> None:
        self._hwm = hwm
        self._to_server: queue.Queue[Received] = queue.Queue(maxsize=hwm)
        self._to_clients: dict[bytes, queue.Queue[bytes]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def server(self) -> InProcServerTransport:
        return InProcServerTransport(self)

    def client(self, credential: str | None = None) -> InProcClientTransport:
        """A new connection; `credential` stands in for the CURVE key it authenticated with."""
        with self._lock:
            identity = f"inproc-{next(self._ids)}".encode()
            self._to_clients[identity] = queue.Queue(maxsize=self._hwm)
        return InProcClientTransport(self, identity, credential)

    def _drop_client(self, identity: bytes) -> None:
        with self._lock:
            self._to_clients.pop(identity, None)


class InProcServerTransport(ServerTransport):
    def __init__(self, hub: InProcHub) -> None:
        self._hub = hub
        self._closed = False

    def send(self, peer: bytes, data: bytes) -> bool:
        if self._closed:
            raise TransportClosed("server transport is closed")
        with self._hub._lock:
            target = self._hub._to_clients.get(peer)
        if target is None:
            return False
        try:
            target.put_nowait(bytes(data))
            return True
        except queue.Full:
            return False

    def recv(self, timeout: float) -> Received | None:
        if self._closed:
            raise TransportClosed("server transport is closed")
        try:
            if timeout > 0:
                return self._hub._to_server.get(timeout=timeout)
            return self._hub._to_server.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._closed = True


class InProcClientTransport(ClientTransport):
    def __init__(self, hub: InProcHub, identity: bytes, credential: str | None = None) -> None:
        self._hub = hub
        self.identity = identity
        self.credential = credential
        self._closed = False

    def send(self, data: bytes) -> bool:
        if self._closed:
            raise TransportClosed("client transport is closed")
        try:
            self._hub._to_server.put_nowait(Received(self.identity, bytes(data), self.credential))
            return True
        except queue.Full:
            return False

    def recv(self, timeout: float) -> bytes | None:
        if self._closed:
            raise TransportClosed("client transport is closed")
        with self._hub._lock:
            inbox = self._hub._to_clients.get(self.identity)
        if inbox is None:
            return None
        try:
            return inbox.get(timeout=timeout) if timeout > 0 else inbox.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._drop_client(self.identity)
