"""`LearnerLink`: what a learner rank says to the broker, over a `BrokerConnection`.

- Batches: `request_batch()` asks for a lease (BatchRequest with an increasing seq) and
  `poll_batch()` collects it. The request is re-sent under the same seq after a re-registration
  (broker restart) and every `resend_interval_s` while unanswered: the broker answers a repeated
  seq with the same lease, so nothing is served twice.
- Weights (rank 0): `publish()` asks to broadcast the current version (PublishRequest) and returns
  the broker's WeightUpdate (broadcast now) or None (deferred); `publish_wanted()` tells whether
  the broker asked for a publish (PublishWanted) since the last call; `report_update()` answers a
  WeightUpdate.
- Commits (rank 0): `commit(version)` after a checkpoint; re-sent until the broker acknowledges.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from tether.common.logging import get_logger
from tether.common.messages import (
    BatchRequest,
    Commit,
    CommitAck,
    Error,
    Hello,
    PublishDeferred,
    PublishRequest,
    PublishWanted,
    RolloutBatch,
    StatusRequest,
    TensorSpec,
    UpdateReport,
    WeightUpdate,
    Welcome,
)
from tether.common.peer import BrokerConnection, BrokerError, new_incarnation

log = get_logger(__name__)


class LearnerLink:
    def __init__(
        self,
        connection: BrokerConnection,
        *,
        rank: int,
        session: str,
        version: Callable[[], int],
        committed_version: Callable[[], int],
        resend_interval_s: float = 5.0,
        incarnation: str | None = None,
    ) -> None:
        """`version` and `committed_version` read the learner's current version and newest
        checkpoint, which every Hello reports."""
        self.conn = connection
        self.rank = rank
        self.session = session
        self.clock = connection.clock
        self.resend_interval_s = resend_interval_s
        self.incarnation = incarnation or new_incarnation()
        self._version = version
        self._committed_version = committed_version
        self._seq = 0
        self._request: tuple[BatchRequest, str, float] | None = None  # request, msg id, sent at
        self._batch: RolloutBatch | None = None
        self._request_error: Error | None = None
        self._publish_wanted = False
        self._commit_pending: int | None = None
        self._commit_sent_at = float("-inf")
        connection.make_hello = self._hello
        connection.on(RolloutBatch, self._on_batch)
        connection.on(PublishWanted, self._on_publish_wanted)
        connection.on(CommitAck, self._on_commit_ack)
        connection.on(Error, self._on_error)
        connection.on_registered(self._on_registered)
        connection.on_tick(self._tick)

    def _hello(self) -> Hello:
        return Hello(peer_id=self.conn.peer_id, role="learner", incarnation=self.incarnation, rank=self.rank,
                     session=self.session, host=socket.gethostname()[:200], pid=os.getpid(),
                     loaded_version=self._version(), committed_version=self._committed_version())

    def register(self, timeout: float = 600.0) -> Welcome:
        return self.conn.register(timeout)

    # ------------------------------------------------------------------ batches

    def request_batch(self, size: int, learner_version: int, max_lag: int) -> None:
        """Ask for a new lease of `size` rollouts for the step at `learner_version`."""
        with self.conn._lock:
            self._seq += 1
            self._batch, self._request_error = None, None
            request = BatchRequest(rank=self.rank, seq=self._seq, size=size, learner_version=learner_version,
                                   max_lag=max_lag)
            self._request = (request, "", float("-inf"))
            if self.conn.registered:
                self._send_request(self.clock())

    def poll_batch(self, timeout: float) -> RolloutBatch | None:
        """The batch for the latest request once it arrived (BrokerError if the broker refused it)."""
        self.conn.wait_until(lambda: self._batch is not None or self._request_error is not None, timeout)
        with self.conn._lock:
            if self._request_error is not None:
                error, self._request_error, self._request = self._request_error, None, None
                raise BrokerError(error.code, error.message)
            batch, self._batch = self._batch, None
            if batch is not None:
                self._request = None
            return batch

    def _send_request(self, now: float) -> None:
        assert self._request is not None
        request = self._request[0]
        msg_id = self.conn.send(request)
        self._request = (request, msg_id, now)

    def _on_batch(self, batch: RolloutBatch, _msg_id: str) -> None:
        if self._request is not None and batch.seq == self._request[0].seq:
            self._batch = batch
        # else: the answer to a request we re-sent after already receiving it (the same lease)

    def _on_error(self, error: Error, _msg_id: str) -> None:
        if self._request is not None and error.ref_msg_id == self._request[1] and error.code != "not_registered":
            self._request_error = error
        elif self._commit_pending is not None and error.code in ("forbidden", "rejected"):
            log.error("the broker refused a commit", version=self._commit_pending, error=error.message)

    # ------------------------------------------------------------------ weights (rank 0)

    def publish(self, version: int, tensors: list[TensorSpec], bucket_bytes: int,
                timeout: float = 30.0) -> WeightUpdate | None:
        """Ask to broadcast `version`; the WeightUpdate to serve now, or None (deferred, or the broker
        did not answer: it will ask again with PublishWanted once it can use the version)."""
        with self.conn._lock:
            self._publish_wanted = False
        try:
            reply = self.conn.request(PublishRequest(version=version, tensors=tensors, bucket_bytes=bucket_bytes),
                                      timeout=timeout)
        except BrokerError as exc:
            log.warning("publish not answered; the broker will ask again", version=version, error=str(exc))
            return None
        if isinstance(reply, PublishDeferred):
            return None
        assert isinstance(reply, WeightUpdate)
        return reply

    def publish_wanted(self) -> bool:
        """Whether the broker asked for a publish since the last `publish()` (the flag is kept)."""
        return self._publish_wanted

    def actors_hold(self, version: int) -> bool:
        """Whether every live actor holds `version` and no weight update is running (False when the
        broker does not answer)."""
        try:
            status = self.conn.request(StatusRequest(), timeout=5.0)
        except BrokerError:
            return False
        actors = [p for p in status.peers if p.role == "actor" and p.alive]
        return not status.update_in_flight and all(p.loaded_version == version for p in actors)

    def _on_publish_wanted(self, wanted: PublishWanted, _msg_id: str) -> None:
        self._publish_wanted = True

    def report_update(self, update: WeightUpdate, *, ok: bool, seconds: float, error: str = "") -> None:
        self.conn.send(UpdateReport(version=update.version, epoch=update.epoch, ok=ok, seconds=seconds,
                                    error=error[:1000]))

    # ------------------------------------------------------------------ commits (rank 0)

    def commit(self, version: int) -> None:
        """Tell the broker the checkpoint at `version` is complete (re-sent until acknowledged)."""
        with self.conn._lock:
            self._commit_pending = version
            self._commit_sent_at = float("-inf")
            if self.conn.registered:
                self._send_commit(self.clock())

    @property
    def commit_pending(self) -> int | None:
        return self._commit_pending

    def _send_commit(self, now: float) -> None:
        assert self._commit_pending is not None
        self.conn.send(Commit(version=self._commit_pending))
        self._commit_sent_at = now

    def _on_commit_ack(self, ack: CommitAck, _msg_id: str) -> None:
        if ack.version == self._commit_pending:
            self._commit_pending = None
            log.info("checkpoint committed", version=ack.version, consumed=ack.consumed)

    # ------------------------------------------------------------------ housekeeping

    def _on_registered(self, welcome: Welcome) -> None:
        now = self.clock()
        if self._request is not None and self._batch is None:
            self._send_request(now)
        if self._commit_pending is not None:
            self._send_commit(now)

    def _tick(self, now: float) -> None:
        if self._request is not None and self._batch is None and now - self._request[2] > self.resend_interval_s:
            self._send_request(now)
        if self._commit_pending is not None and now - self._commit_sent_at > self.resend_interval_s:
            self._send_commit(now)
