"""`BrokerConnection`: one peer's line to the broker (registration, liveness, request/reply).

Every daemon talks to the broker through one connection; what it says is role-specific and lives
with the role: `tether.actor.broker_link.ActorLink`, `tether.learner.broker_link.LearnerLink`.
Tools (`tether status`) need only `request(StatusRequest())`, which needs no registration.

- Registration: `register()` sends Hello (built fresh by the role each time, so it carries the
  current versions) and waits for Welcome, retrying until the broker answers. Whenever the broker
  answers `not_registered` (it restarted, or declared this peer dead), the connection registers
  again at once and, once welcomed, calls every `on_registered` callback so the role re-sends what
  the broker may have lost (unacked rollouts, parked requests).
- Liveness: a Heartbeat every `heartbeat_interval_s` while registered.
- Replies: a message whose envelope `msg_id` answers a `request()` goes to that caller; every other
  message goes to the handler registered for its record type with `on(type, handler)`.

All socket use happens under one lock, by whichever thread holds it, so a connection is safe to
share between threads. `start()` runs a background thread that pumps every few milliseconds
(mostly asleep in libzmq's poll), so handlers run and heartbeats flow even while the caller is busy.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.errors import TetherError, WireDecodeError
from tether.common.logging import get_logger
from tether.common.messages import Error, Heartbeat, Hello, Record, Welcome
from tether.common.transport import ClientTransport, ZmqClientTransport, load_client_keys

log = get_logger(__name__)

# Longest a pump holds the lock waiting on the socket, so other threads get their turn quickly.
_PUMP_SLICE_S = 0.02


class BrokerError(TetherError):
    """The broker answered a request with an Error, or did not answer in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def new_incarnation() -> str:
    """A random id for one process start (Hello.incarnation)."""
    return uuid.uuid4().hex[:16]


class BrokerConnection:
    """A peer's connection to the broker (see module docstring)."""

    def __init__(
        self,
        transport: ClientTransport,
        *,
        peer_id: str,
        make_hello: Callable[[], Hello] | None = None,
        heartbeat_interval_s: float = 1.0,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.peer_id = peer_id
        self.make_hello = make_hello
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self.welcome: Welcome | None = None
        """The broker's latest Welcome (None until registered)."""
        self.registrations = 0
        """How many times the broker welcomed this peer (1 + re-registrations)."""
        self.errors: list[Error] = []
        """Recent Error messages from the broker that answered no request, newest last."""
        self._lock = threading.RLock()
        self._handlers: dict[type, Callable[[Record, str], None]] = {}
        self._on_registered: list[Callable[[Welcome], None]] = []
        self._on_tick: list[Callable[[float], None]] = []
        self._replies: dict[str, Record] = {}
        self._waiting: set[str] = set()
        self._registered = False
        self._hello_msg_id: str | None = None
        self._hello_sent_at = float("-inf")
        self._hb_seq = 0
        self._next_heartbeat = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: BrokerConfig, *, peer_id: str, role: str, **kwargs) -> BrokerConnection:
        """A connection over a ZeroMQ DEALER to `cfg.host:cfg.port`, with CURVE keys when enabled
        (the client key named `cfg.curve_client_name`, or the role's)."""
        curve = load_client_keys(cfg.keys_dir, cfg.curve_client_name or role) if cfg.curve_enabled else None
        transport = ZmqClientTransport(
            f"tcp://{cfg.host}:{cfg.port}", max_message_bytes=cfg.max_message_bytes + 65536, curve=curve
        )
        kwargs.setdefault("heartbeat_interval_s", cfg.heartbeat_interval_s)
        kwargs.setdefault("max_message_bytes", cfg.max_message_bytes)
        return cls(transport, peer_id=peer_id, **kwargs)

    # ------------------------------------------------------------------ wiring

    def on(self, record_type: type[Record], handler: Callable[[Record, str], None]) -> None:
        """Call `handler(record, msg_id)` (under the connection's lock) for unsolicited `record_type`."""
        self._handlers[record_type] = handler

    def on_registered(self, callback: Callable[[Welcome], None]) -> None:
        """Call `callback(welcome)` (under the lock) after every successful (re-)registration."""
        self._on_registered.append(callback)

    def on_tick(self, callback: Callable[[float], None]) -> None:
        """Call `callback(now)` (under the lock) on every pump while registered: the role's resends."""
        self._on_tick.append(callback)

    @property
    def registered(self) -> bool:
        return self._registered

    def reregister(self) -> None:
        """Send Hello again now (the peer's state changed in a way the broker must learn)."""
        with self._lock:
            self._registered = False
            self._send_hello()

    # ------------------------------------------------------------------ lifecycle

    def register(self, timeout: float = 600.0) -> Welcome:
        """Send Hello until the broker welcomes this peer; BrokerError on refusal or after `timeout`."""
        if self.make_hello is None:
            raise TypeError("this connection has no Hello to register with (make_hello)")
        deadline = self.clock() + timeout
        next_report = self.clock() + 10.0
        while True:
            with self._lock:
                if self._registered and self.welcome is not None:
                    return self.welcome
                refusal = next((e for e in self.errors if e.ref_msg_id and e.ref_msg_id == self._hello_msg_id
                                and e.code != "not_registered"), None)
                if refusal is not None:
                    raise BrokerError(refusal.code, refusal.message)
                if self.clock() - self._hello_sent_at > 1.0:
                    self._send_hello()
                if self._thread is None:
                    self._pump_locked(_PUMP_SLICE_S)
            if self._thread is not None:
                time.sleep(0.005)
            now = self.clock()
            if now >= deadline:
                raise BrokerError("timeout", f"the broker did not welcome {self.peer_id!r} within {timeout:.0f}s")
            if now >= next_report:
                log.info("waiting for the broker", peer=self.peer_id)
                next_report = now + 10.0

    def start(self) -> BrokerConnection:
        """Pump in a background daemon thread (heartbeats, handlers, re-registration)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"broker-{self.peer_id}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread and close the transport."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if not self._closed:
                self._closed = True
                self.transport.close()

    def __enter__(self) -> BrokerConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ messaging

    def send(self, body: Record, msg_id: str | None = None) -> str:
        """Send `body` without waiting; returns its msg_id. A message dropped at our own high-water
        mark is lost like one lost in transit: the role's resends and timeouts recover it."""
        msg_id = msg_id or wire.new_msg_id()
        with self._lock:
            if not self._closed:
                self.transport.send(wire.encode(body, sender=self.peer_id, msg_id=msg_id))
        return msg_id

    def request(self, body: Record, timeout: float = 10.0) -> Record:
        """Send `body` and wait for the reply; BrokerError on an Error reply or after `timeout`."""
        msg_id = self.expect_reply()
        self.send(body, msg_id)
        return self.wait_reply(msg_id, timeout)

    def expect_reply(self) -> str:
        """A msg_id whose reply will be kept for `wait_reply`/`take_reply` (reserve before sending)."""
        msg_id = wire.new_msg_id()
        with self._lock:
            self._waiting.add(msg_id)
        return msg_id

    def take_reply(self, msg_id: str) -> Record | None:
        """The reply to `msg_id` if it arrived (it is then forgotten), else None. Never raises."""
        with self._lock:
            reply = self._replies.pop(msg_id, None)
            if reply is not None:
                self._waiting.discard(msg_id)
            return reply

    def forget_reply(self, msg_id: str) -> None:
        with self._lock:
            self._waiting.discard(msg_id)
            self._replies.pop(msg_id, None)

    def wait_reply(self, msg_id: str, timeout: float) -> Record:
        try:
            if not self.wait_until(lambda: msg_id in self._replies, timeout):
                raise BrokerError("timeout", f"no reply from the broker within {timeout:.1f}s")
            reply = self.take_reply(msg_id)
        finally:
            self.forget_reply(msg_id)
        if isinstance(reply, Error):
            raise BrokerError(reply.code, reply.message)
        assert reply is not None
        return reply

    def poll(self, timeout: float = 0.0) -> None:
        """Handle incoming messages for up to `timeout` seconds and do due housekeeping."""
        deadline = self.clock() + timeout
        while True:
            with self._lock:
                self._pump_locked(min(_PUMP_SLICE_S, max(0.0, deadline - self.clock())))
            if self.clock() >= deadline:
                return

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Pump (or, with the background thread, sleep) until `condition()` (checked under the lock)."""
        deadline = self.clock() + timeout
        while True:
            with self._lock:
                if condition():
                    return True
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                if self._thread is None:
                    self._pump_locked(min(_PUMP_SLICE_S, remaining))
            if self._thread is not None:
                time.sleep(min(0.002, max(remaining, 0)))

    # ------------------------------------------------------------------ internals

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._closed:
                    return
                try:
                    self._pump_locked(_PUMP_SLICE_S)
                except Exception:  # a handler bug must not silently stop heartbeats
                    log.exception("broker connection handler failed", peer=self.peer_id)
            # Leave the lock free for a moment so callers are never starved by this thread.
            time.sleep(0.001)

    def _send_hello(self) -> None:
        if self.make_hello is None:
            return
        self._hello_msg_id = self.send(self.make_hello())
        self._hello_sent_at = self.clock()

    def _pump_locked(self, timeout: float) -> None:
        if self._closed:
            return
        data = self.transport.recv(timeout)
        while data is not None:
            self._dispatch(data)
            data = self.transport.recv(0)
        self._housekeeping()

    def _dispatch(self, data: bytes) -> None:
        try:
            message = wire.decode(data, max_bytes=self.max_message_bytes)
        except WireDecodeError as exc:
            log.warning("undecodable message from the broker", error=str(exc)[:200])
            return
        body, msg_id = message.body, message.msg_id
        if isinstance(body, Welcome) and msg_id == self._hello_msg_id:
            first = self.welcome is None or self.welcome.broker_incarnation != body.broker_incarnation
            self.welcome, self._registered = body, True
            self._hello_msg_id = None
            self.registrations += 1
            if self.registrations > 1:
                log.info("registered with the broker again", peer=self.peer_id, broker_restarted=first)
            for callback in self._on_registered:
                callback(body)
            return
        if isinstance(body, Error):
            if body.code == "not_registered" and self.make_hello is not None:
                # The broker restarted or declared us dead: register again now (replies it lost
                # are re-sent by the roles' on_registered callbacks).
                if self._registered:
                    log.warning("the broker does not know this peer; registering again", peer=self.peer_id)
                self._registered = False
                if self.clock() - self._hello_sent_at > 0.2:
                    self._send_hello()
            ref = body.ref_msg_id or msg_id
            if ref in self._waiting:
                self._replies[ref] = body
                return
            self.errors = (self.errors + [body])[-100:]
            handler = self._handlers.get(Error)
            if handler is not None:
                handler(body, msg_id)
            return
        if msg_id in self._waiting:
            self._replies[msg_id] = body
            return
        handler = self._handlers.get(type(body))
        if handler is not None:
            handler(body, msg_id)

    def _housekeeping(self) -> None:
        now = self.clock()
        if not self._registered:
            wants_registration = self._hello_msg_id is not None or self.registrations > 0
            if wants_registration and now - self._hello_sent_at > max(1.0, self.heartbeat_interval_s):
                self._send_hello()  # the Hello (or its Welcome) was lost: ask again
            return
        if now >= self._next_heartbeat:
            self._hb_seq += 1
            self.send(Heartbeat(seq=self._hb_seq))
            self._next_heartbeat = now + self.heartbeat_interval_s
        for callback in self._on_tick:
            callback(now)
