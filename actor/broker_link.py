"""`ActorLink`: what an actor says to the broker, over a `BrokerConnection`.

- Rollouts are delivered at least once: each is kept until an Ack names it, sent again every
  `resend_interval_s` (bounded bursts) and all at once after registering again (the broker
  restarted). The broker de-duplicates by rollout id. Ids the broker asks to `retry` (buffer full,
  weights not current) wait `resend_interval_s`; ids it calls `invalid` are dropped, logged and
  counted. Beyond `max_unacked` unacked rollouts `send_rollouts` raises `Backpressure`.
- Generation grants: `acquire_group()` takes one grant to start a group, asking the broker for
  more (GenerationRequest) when none is left; a grant arrives only when the group's rollouts can
  still be trained on (admission by version, broker/admission.py).
- Weight updates arrive as WeightUpdate records in `next_update()`; the actor answers each with
  `report_update()`.
"""

from __future__ import annotations

import os
import queue
import socket
from collections import OrderedDict
from collections.abc import Iterable

from tether.common.logging import get_logger
from tether.common.messages import (
    Ack,
    GenerationGrant,
    GenerationRequest,
    Hello,
    Rollout,
    SubmitRollouts,
    UpdateReport,
    WeightUpdate,
    Welcome,
)
from tether.common.peer import BrokerConnection, BrokerError, new_incarnation

log = get_logger(__name__)

# Rollouts resent per housekeeping pass, so a long outage does not turn into one giant burst.
_RESEND_BURST = 4


class Backpressure(BrokerError):
    """Too many rollouts are unacked; wait (`wait_for_capacity`) before sending more."""

    def __init__(self, message: str) -> None:
        super().__init__("backpressure", message)


class _Pending:
    __slots__ = ("rollout", "last_sent", "first_sent", "hold_until")

    def __init__(self, rollout: Rollout, now: float) -> None:
        self.rollout = rollout
        self.last_sent = float("-inf")
        self.first_sent = now
        self.hold_until = float("-inf")


class ActorLink:
    def __init__(
        self,
        connection: BrokerConnection,
        *,
        worker_count: int = 1,
        max_unacked: int = 1024,
        max_batch_rollouts: int = 32,
        resend_interval_s: float = 2.0,
        incarnation: str | None = None,
    ) -> None:
        self.conn = connection
        self.actor_id = connection.peer_id
        self.clock = connection.clock
        self.worker_count = worker_count
        self.max_unacked = max_unacked
        self.max_batch_rollouts = max_batch_rollouts
        self.resend_interval_s = resend_interval_s
        self.incarnation = incarnation or new_incarnation()
        self.loaded_version = 0
        """Version of the weights the engine holds (the daemon sets it after every update)."""
        self.loaded_lineage = ""
        self.acked_total = 0
        """Distinct rollouts the broker acknowledged: the actor's side of the books."""
        self.invalid_total = 0
        self.discarded_total = 0
        """Unacked rollouts discarded because their lineage was abandoned (never acked, never counted)."""
        self.ack_latencies: list[float] | None = None
        """Set to a list to collect first-send-to-ack seconds per rollout (benchmarks)."""
        self._unacked: OrderedDict[str, _Pending] = OrderedDict()
        self._credits = 0
        self._request_seq = 0
        self._request_sent_at: float | None = None
        self._wanted = 0
        self._updates: queue.Queue[WeightUpdate] = queue.Queue()
        connection.make_hello = self._hello
        connection.on(Ack, self._on_ack)
        connection.on(GenerationGrant, self._on_grant)
        connection.on(WeightUpdate, lambda update, _: self._updates.put(update))
        connection.on_registered(self._on_registered)
        connection.on_tick(self._tick)

    def _hello(self) -> Hello:
        return Hello(peer_id=self.actor_id, role="actor", incarnation=self.incarnation,
                     worker_count=self.worker_count, host=socket.gethostname()[:200], pid=os.getpid(),
                     loaded_version=self.loaded_version, loaded_lineage=self.loaded_lineage)

    def register(self, timeout: float = 600.0) -> Welcome:
        return self.conn.register(timeout)

    # ------------------------------------------------------------------ rollouts

    @property
    def unacked_count(self) -> int:
        return len(self._unacked)

    def send_rollouts(self, rollouts: Iterable[Rollout]) -> None:
        """Send rollouts; each is kept until acked. Raises Backpressure (sending none) past max_unacked."""
        rollouts = list(rollouts)
        with self.conn._lock:
            if len(self._unacked) + len(rollouts) > self.max_unacked:
                raise Backpressure(f"{len(self._unacked)} rollouts unacked, limit {self.max_unacked}")
            now = self.clock()
            fresh = [r for r in rollouts if r.rollout_id not in self._unacked]
            for r in fresh:
                self._unacked[r.rollout_id] = _Pending(r, now)
            if self.conn.registered:
                self._send_chunks([self._unacked[r.rollout_id] for r in fresh], now)

    def wait_for_capacity(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Until `n` more rollouts fit under max_unacked; False on timeout."""
        return self.conn.wait_until(lambda: len(self._unacked) + n <= self.max_unacked, timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Until every rollout is acked; False on timeout."""
        return self.conn.wait_until(lambda: not self._unacked, timeout)

    def discard_unacked_above(self, version: int) -> int:
        """Forget unacked rollouts holding a token above `version` (an abandoned lineage)."""
        with self.conn._lock:
            doomed = [rid for rid, p in self._unacked.items() if p.rollout.max_version > version]
            for rid in doomed:
                del self._unacked[rid]
            self.discarded_total += len(doomed)
        return len(doomed)

    def _send_chunks(self, pending: list[_Pending], now: float) -> None:
        for start in range(0, len(pending), self.max_batch_rollouts):
            chunk = pending[start : start + self.max_batch_rollouts]
            self.conn.send(SubmitRollouts(rollouts=[p.rollout for p in chunk]))
            for p in chunk:
                p.last_sent = now

    def _on_ack(self, ack: Ack, _msg_id: str) -> None:
        now = self.clock()
        for rid in ack.acked:
            pending = self._unacked.pop(rid, None)
            if pending is not None:
                self.acked_total += 1
                if self.ack_latencies is not None:
                    self.ack_latencies.append(now - pending.first_sent)
        for rid in ack.retry:
            pending = self._unacked.get(rid)
            if pending is not None:
                pending.hold_until = now + self.resend_interval_s
        for rejection in ack.invalid:
            if self._unacked.pop(rejection.rollout_id, None) is not None:
                self.invalid_total += 1
                if self.invalid_total <= 10:
                    log.error("the broker refused an invalid rollout", rollout=rejection.rollout_id,
                              reason=rejection.reason)

    # ------------------------------------------------------------------ generation grants

    def acquire_group(self, wanted: int, timeout: float) -> bool:
        """Take one generation grant, asking for up to `wanted` groups when none is left; False
        after `timeout` without one."""
        with self.conn._lock:
            self._wanted = max(1, wanted)
            if self._credits == 0 and self._request_sent_at is None and self.conn.registered:
                self._request_groups(self.clock())
        if not self.conn.wait_until(lambda: self._credits > 0, timeout):
            return False
        with self.conn._lock:
            if self._credits == 0:
                return False
            self._credits -= 1
            return True

    @property
    def credits(self) -> int:
        return self._credits

    def _request_groups(self, now: float) -> None:
        self._request_seq += 1
        self.conn.send(GenerationRequest(seq=self._request_seq, groups=self._wanted))
        self._request_sent_at = now

    def _on_grant(self, grant: GenerationGrant, _msg_id: str) -> None:
        if grant.seq == self._request_seq:
            self._request_sent_at = None
        self._credits += grant.groups

    # ------------------------------------------------------------------ weights

    def next_update(self, timeout: float = 0.0) -> WeightUpdate | None:
        """The next WeightUpdate the broker sent, or None after `timeout` seconds."""
        try:
            return self._updates.get(timeout=timeout) if timeout > 0 else self._updates.get_nowait()
        except queue.Empty:
            return None

    def report_update(self, version: int, epoch: int, *, ok: bool, seconds: float = 0.0, error: str = "") -> None:
        self.conn.send(UpdateReport(version=version, epoch=epoch, ok=ok, seconds=seconds, error=error[:1000]))

    # ------------------------------------------------------------------ housekeeping

    def _on_registered(self, welcome: Welcome) -> None:
        # The broker released our grants and may have lost our rollouts: ask and send afresh.
        self._credits = 0
        self._request_sent_at = None
        for pending in self._unacked.values():
            pending.last_sent = float("-inf")
            pending.hold_until = float("-inf")
        if not welcome.ready:
            log.info("registered; waiting for the current weights before sending rollouts",
                     latest_version=welcome.latest_version)

    def _tick(self, now: float) -> None:
        if self._request_sent_at is not None and now - self._request_sent_at > 5 * self.resend_interval_s:
            self._request_groups(now)  # the request or its grant was lost: ask again
        if self._unacked:
            due = []
            limit = _RESEND_BURST * self.max_batch_rollouts
            for pending in self._unacked.values():
                if now >= pending.hold_until and now - pending.last_sent >= self.resend_interval_s:
                    due.append(pending)
                    if len(due) >= limit:
                        break
            if due:
                self._send_chunks(due, now)
