"""`BrokerClient`: how actors, learner ranks and tools talk to the broker.

One client owns one `ClientTransport`. All socket use happens under the client's lock, by whichever
thread holds it, so the client is safe to share between threads:

- Call-driven: every public method pumps incoming messages and does the housekeeping that is due
  (heartbeat, resends, re-registration); `poll(timeout)` does only that.
- Background: `start()` runs a daemon thread that pumps every few milliseconds (mostly asleep in
  libzmq's poll, so it costs next to nothing on a 2-core machine); incoming WeightsAnnounce records
  then wait in `next_weights_announce()` even while the caller is busy.

Rollouts are delivered at least once: each is kept until the broker acks it, resent after
`resend_interval_s`, resent at once after re-registering (a broker restart answers "not_registered"),
and refused locally beyond `max_unacked` (`Backpressure`), so the actor applies backpressure instead
of growing memory. The broker de-duplicates by rollout id.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.errors import TetherError, WireDecodeError
from tether.common.messages import (
    Ack,
    BatchRequest,
    Error,
    Heartbeat,
    Hello,
    Record,
    Rollout,
    RolloutBatch,
    Status,
    StatusRequest,
    TensorSpec,
    VersionAck,
    WeightsAnnounce,
)
from tether.common.transport import ClientTransport, ZmqClientTransport, load_client_keys

# Longest a pump holds the lock waiting on the socket, so other threads get their turn quickly.
_PUMP_SLICE_S = 0.02
# Rollouts resent per housekeeping pass, so a long outage does not turn into one giant burst.
_RESEND_BURST = 4


class BrokerError(TetherError):
    """The broker answered a request with an Error, or did not answer in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Backpressure(BrokerError):
    """Too many rollouts are unacked; wait (`wait_for_capacity`) before sending more."""

    def __init__(self, message: str) -> None:
        super().__init__("backpressure", message)


class BrokerClient:
    """A peer's connection to the broker (see module docstring)."""

    def __init__(
        self,
        transport: ClientTransport,
        *,
        peer_id: str,
        role: str,
        worker_count: int = 1,
        heartbeat_interval_s: float = 1.0,
        resend_interval_s: float = 2.0,
        max_unacked: int = 1024,
        max_batch_rollouts: int = 32,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.peer_id = peer_id
        self.role = role
        self.worker_count = worker_count
        self.heartbeat_interval_s = heartbeat_interval_s
        self.resend_interval_s = resend_interval_s
        self.max_unacked = max_unacked
        self.max_batch_rollouts = max_batch_rollouts
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self.loaded_version = -1
        """Weight version this peer holds; reported in Hello and heartbeats. Set it after loading."""
        self.requests_in_flight = 0
        """Reported in heartbeats (the actor sets it)."""
        self.errors: deque[Error] = deque(maxlen=100)
        """Recent Error replies from the broker, newest last."""
        self.ack_latencies: list[float] | None = None
        """Set to a list to collect first-send-to-ack seconds per rollout (benchmarks)."""
        self.quota: tuple[int, int] | None = None
        """weights.mode=stop_the_world: (version, rollouts left) from the broker's newest Ack carrying a
        quota (the highest version wins, so a late Ack for an older version never overrides it)."""

        self._lock = threading.RLock()
        self._unacked: OrderedDict[str, list] = OrderedDict()  # id -> [rollout, last_sent, first_sent]
        self.acked_total = 0
        """Distinct rollouts the broker acknowledged (stored): the actor's side of the books."""
        self._replies: dict[str, Record] = {}
        self._waiting: set[str] = set()
        self._batches: deque[RolloutBatch] = deque()
        self._announces: queue.Queue[WeightsAnnounce] = queue.Queue()
        self._hb_seq = 0
        self._next_heartbeat = 0.0
        self._resend_hold_until = 0.0
        self._registered = False
        self._hello_msg_id: str | None = None
        self._hello_sent_at = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: BrokerConfig, *, peer_id: str, role: str, worker_count: int = 1, **kwargs) -> BrokerClient:
        """A client on a ZeroMQ DEALER to `cfg.host:cfg.port`, with CURVE keys when enabled."""
        curve = load_client_keys(cfg.keys_dir, cfg.curve_client_name) if cfg.curve_enabled else None
        transport = ZmqClientTransport(
            f"tcp://{cfg.host}:{cfg.port}", max_message_bytes=cfg.max_message_bytes + 65536, curve=curve
        )
        kwargs.setdefault("heartbeat_interval_s", cfg.heartbeat_interval_s)
        kwargs.setdefault("max_message_bytes", cfg.max_message_bytes)
        return cls(transport, peer_id=peer_id, role=role, worker_count=worker_count, **kwargs)

    # ------------------------------------------------------------------ lifecycle

    def hello(self, loaded_version: int | None = None, timeout: float = 10.0) -> Status:
        """Register with the broker and return its Status. Raises BrokerError on refusal or timeout."""
        if loaded_version is not None:
            self.loaded_version = loaded_version
        with self._lock:
            msg_id = self._send_hello()
            self._waiting.add(msg_id)
        reply = self._wait_reply(msg_id, timeout)
        assert isinstance(reply, Status)
        return reply

    def start(self) -> BrokerClient:
        """Pump in a background daemon thread (heartbeats, resends, incoming announces)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"broker-client-{self.peer_id}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread and close the transport (unacked rollouts are abandoned)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if not self._closed:
                self._closed = True
                self.transport.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def poll(self, timeout: float = 0.0) -> None:
        """Handle incoming messages for up to `timeout` seconds and do due housekeeping."""
        deadline = self.clock() + timeout
        while True:
            with self._lock:
                self._pump_locked(min(_PUMP_SLICE_S, max(0.0, deadline - self.clock())))
            if self.clock() >= deadline:
                return

    # ------------------------------------------------------------------ actor side

    @property
    def unacked_count(self) -> int:
        """Rollouts sent (or queued) and not yet acked by the broker."""
        return len(self._unacked)

    def send_rollouts(self, rollouts: Iterable[Rollout]) -> None:
        """Send rollouts; each is kept until acked. Raises Backpressure (sending none) past max_unacked."""
        rollouts = list(rollouts)
        with self._lock:
            if len(self._unacked) + len(rollouts) > self.max_unacked:
                raise Backpressure(f"{len(self._unacked)} rollouts unacked, limit {self.max_unacked}")
            now = self.clock()
            for r in rollouts:
                if r.rollout_id not in self._unacked:
                    self._unacked[r.rollout_id] = [r, now, now]
            if self._registered and now >= self._resend_hold_until:
                self._send_rollout_chunks(rollouts, now)
            self._pump_locked(0.0)

    def wait_for_capacity(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Pump until `n` more rollouts fit under max_unacked; False on timeout."""
        return self._wait_until(lambda: len(self._unacked) + n <= self.max_unacked, timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Pump until every rollout is acked; False on timeout."""
        return self._wait_until(lambda: not self._unacked, timeout)

    def next_weights_announce(self, timeout: float = 0.0) -> WeightsAnnounce | None:
        """The next WeightsAnnounce the broker sent (actor: load this version; learner: broadcast it)."""
        deadline = self.clock() + timeout
        while True:
            try:
                return self._announces.get_nowait()
            except queue.Empty:
                pass
            remaining = deadline - self.clock()
            if remaining <= 0:
                return None
            if self._thread is not None:
                try:
                    return self._announces.get(timeout=min(remaining, 0.05))
                except queue.Empty:
                    continue
            self.poll(min(remaining, _PUMP_SLICE_S))

    def send_version_ack(self, version: int, epoch: int, *, ok: bool = True, pause_seconds: float = 0.0,
                         error: str = "") -> None:
        """Tell the broker this peer loaded (ok) or failed to load `version` of `epoch`."""
        with self._lock:
            if ok:
                self.loaded_version = max(self.loaded_version, version)
            self._send(VersionAck(peer_id=self.peer_id, version=version, epoch=epoch, ok=ok,
                                  pause_seconds=pause_seconds, error=error[:1000]))

    # ------------------------------------------------------------------ learner side

    def request_batch(self, rank: int, size: int, learner_version: int, max_lag: int,
                      timeout: float = 30.0) -> RolloutBatch | None:
        """Ask for `size` rollouts (whole groups) and wait; None on timeout.

        The broker parks the request until enough complete groups are buffered. A batch that
        arrives after a timeout is kept and returned by the next call, so nothing consumed is lost.
        """
        with self._lock:
            if self._batches:
                return self._batches.popleft()
            self._send(BatchRequest(rank=rank, size=size, learner_version=learner_version, max_lag=max_lag))
        self._wait_until(lambda: bool(self._batches), timeout)
        with self._lock:
            return self._batches.popleft() if self._batches else None

    def announce_weights(self, version: int, tensors: list[TensorSpec], bucket_bytes: int,
                         timeout: float = 300.0) -> WeightsAnnounce:
        """Learner rank 0: announce `version` and wait for the broker's go (epoch, world size).

        A go with group_world_size == 1 means no actor is in the epoch: skip the broadcast.
        Later re-sends (re-formed epochs, re-publish for a joining actor) arrive via
        `next_weights_announce`.
        """
        msg_id = wire.new_msg_id()
        with self._lock:
            self._waiting.add(msg_id)
            self._send(WeightsAnnounce(version=version, epoch=0, tensors=tensors, bucket_bytes=bucket_bytes),
                       msg_id=msg_id)
        reply = self._wait_reply(msg_id, timeout)
        assert isinstance(reply, WeightsAnnounce)
        return reply

    # ------------------------------------------------------------------ any peer

    def status(self, timeout: float = 5.0) -> Status:
        """The broker's Status (needs no Hello)."""
        msg_id = wire.new_msg_id()
        with self._lock:
            self._waiting.add(msg_id)
            self._send(StatusRequest(), msg_id=msg_id)
        reply = self._wait_reply(msg_id, timeout)
        assert isinstance(reply, Status)
        return reply

    # ------------------------------------------------------------------ internals

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._closed:
                    return
                self._pump_locked(_PUMP_SLICE_S)
            # Leave the lock free for a moment so callers are never starved by this thread.
            time.sleep(0.001)

    def _send(self, body: Record, msg_id: str | None = None) -> str:
        msg_id = msg_id or wire.new_msg_id()
        if not self.transport.send(wire.encode(body, sender=self.peer_id, msg_id=msg_id)):
            # Dropped at our own high-water mark: requests time out, rollouts are resent.
            pass
        return msg_id

    def _send_hello(self) -> str:
        with self._lock:
            body = Hello(peer_id=self.peer_id, role=self.role, worker_count=self.worker_count,  # type: ignore[arg-type]
                         host=socket.gethostname()[:200], pid=os.getpid(), loaded_version=self.loaded_version)
            self._hello_msg_id = self._send(body)
            self._hello_sent_at = self.clock()
            return self._hello_msg_id

    def _wait_reply(self, msg_id: str, timeout: float) -> Record:
        # The caller put msg_id in _waiting under the same lock as the send, so no reply is missed.
        try:
            if not self._wait_until(lambda: msg_id in self._replies, timeout):
                raise BrokerError("timeout", f"no reply from the broker within {timeout:.1f}s")
            with self._lock:
                reply = self._replies.pop(msg_id)
        finally:
            with self._lock:
                self._waiting.discard(msg_id)
                self._replies.pop(msg_id, None)
        if isinstance(reply, Error):
            raise BrokerError(reply.code, reply.message)
        return reply

    def _wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
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

    def _send_rollout_chunks(self, rollouts: list[Rollout], now: float) -> None:
        for start in range(0, len(rollouts), self.max_batch_rollouts):
            chunk = rollouts[start : start + self.max_batch_rollouts]
            self._send(RolloutBatch(rollouts=chunk))
            for r in chunk:
                entry = self._unacked.get(r.rollout_id)
                if entry is not None:
                    entry[1] = now

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
        except WireDecodeError:
            return  # the broker never sends garbage; ignoring it is all a client can do
        body, msg_id = message.body, message.msg_id
        if isinstance(body, Ack):
            if body.quota_version >= 0 and (self.quota is None or body.quota_version >= self.quota[0]):
                self.quota = (body.quota_version, body.quota_left)
            now = self.clock()
            for rid in body.rollout_ids:
                entry = self._unacked.pop(rid, None)
                if entry is not None:
                    self.acked_total += 1
                    if self.ack_latencies is not None:
                        self.ack_latencies.append(now - entry[2])
        elif isinstance(body, Error):
            self.errors.append(body)
            if body.code == "not_registered":
                # The broker restarted (or declared us dead): register again, then resend everything.
                self._registered = False
                if self._hello_msg_id is None or self.clock() - self._hello_sent_at > self.resend_interval_s:
                    self._send_hello()
            elif body.code == "rejected":
                self._resend_hold_until = self.clock() + self.resend_interval_s
            ref = body.ref_msg_id or msg_id
            if ref in self._waiting:
                self._replies[ref] = body
            return
        elif isinstance(body, RolloutBatch):
            self._batches.append(body)
            return
        elif isinstance(body, WeightsAnnounce) and msg_id not in self._waiting:
            self._announces.put(body)
            return
        if isinstance(body, Status) and msg_id == self._hello_msg_id:
            self._registered = True
            self._hello_msg_id = None
            self._resend_hold_until = 0.0
            for entry in self._unacked.values():
                entry[1] = float("-inf")  # resend everything now
        if msg_id in self._waiting:
            self._replies[msg_id] = body

    def _housekeeping(self) -> None:
        now = self.clock()
        if not self._registered:
            return
        if now >= self._next_heartbeat:
            self._hb_seq += 1
            self._send(Heartbeat(peer_id=self.peer_id, seq=self._hb_seq, loaded_version=self.loaded_version,
                                 unacked_rollouts=len(self._unacked), requests_in_flight=self.requests_in_flight))
            self._next_heartbeat = now + self.heartbeat_interval_s
        if self._unacked and now >= self._resend_hold_until:
            due = []
            limit = _RESEND_BURST * self.max_batch_rollouts
            for entry in self._unacked.values():
                if now - entry[1] >= self.resend_interval_s:
                    due.append(entry[0])
                    if len(due) >= limit:
                        break
            if due:
                self._send_rollout_chunks(due, now)
