"""The broker's server loop: moves bytes between a ServerTransport and a BrokerState.

Single-threaded on purpose: the state needs no locks, and every send is non-blocking (a peer that
does not read has its messages dropped at the high-water mark and recovers through resends), so no
peer can stall the loop for the others. Messages are handled in arrival order, at most
`MAX_BATCH` between two `tick`s so time-driven rules run even under a flood.
"""

from __future__ import annotations

import threading
import time

from tether.broker.buffer import RolloutBuffer
from tether.broker.journal import Journal
from tether.broker.state import BrokerState, Outgoing
from tether.common.config.broker import BrokerConfig
from tether.common.logging import get_logger
from tether.common.transport import ServerTransport, ZmqServerTransport, load_server_keys

MAX_BATCH = 256
# libzmq must let a frame a little over the decoder's limit through so the decoder can answer
# "too_large" with an Error; frames far beyond it are cut off by libzmq itself.
ZMQ_SIZE_SLACK = 64 * 1024


def build_state(cfg: BrokerConfig, clock=time.monotonic, *, mode: str = "inflight",
                rollouts_per_step: int = 0) -> BrokerState:
    """A BrokerState with its buffer, replaying the journal when one is configured.

    `mode` (weights.mode) and `rollouts_per_step` (learner.rollouts_per_step) set the
    stop-the-world quota; the defaults are the in-flight mode, which has none.
    """
    journal = None
    if cfg.journal_path:
        journal = Journal(cfg.journal_path, fsync=cfg.journal_fsync, fsync_interval_s=cfg.journal_fsync_interval_s)
    buffer = RolloutBuffer(cfg.buffer_capacity, dedup_window=cfg.dedup_window, journal=journal)
    restored = buffer.replay_journal()
    state = BrokerState(cfg, buffer, clock=clock, mode=mode, rollouts_per_step=rollouts_per_step)
    if journal is not None:
        state.log.info("journal replayed", path=cfg.journal_path, rollouts=restored)
    return state


def build_transport(cfg: BrokerConfig) -> ZmqServerTransport:
    curve = load_server_keys(cfg.keys_dir) if cfg.curve_enabled else None
    return ZmqServerTransport(
        f"tcp://{cfg.host}:{cfg.port}",
        max_message_bytes=cfg.max_message_bytes + ZMQ_SIZE_SLACK,
        hwm=cfg.send_hwm,
        curve=curve,
    )


class BrokerServer:
    """Runs `state` on `transport` until `stop()`; optionally hosts the weight group's TCPStore."""

    def __init__(self, cfg: BrokerConfig, state: BrokerState, transport: ServerTransport) -> None:
        self.cfg = cfg
        self.state = state
        self.transport = transport
        self.log = get_logger("tether.broker")
        self._stop = threading.Event()
        self.store = None

    def start_store(self) -> None:
        """Host the torch.distributed TCPStore every weight-group epoch rendezvous on."""
        from datetime import timedelta

        import torch.distributed as dist

        self.store = dist.TCPStore(
            self.cfg.host, self.cfg.store_port, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=max(self.cfg.update_timeout_s, 30.0)),
        )
        self.log.info("weight-group store listening", host=self.cfg.host, port=self.cfg.store_port)

    def stop(self) -> None:
        self._stop.set()

    def _send(self, out: list[Outgoing]) -> None:
        for item in out:
            if not self.transport.send(item.peer, item.encode()):
                self.state.counters["send_dropped"] += 1

    def serve_forever(self) -> None:
        state = self.state
        journal = state.buffer.journal
        next_tick = 0.0
        while not self._stop.is_set():
            now = state.clock()
            if now >= next_tick:
                self._send(state.tick())
                next_tick = now + min(0.2, self.cfg.heartbeat_interval_s / 2)
            timeout = max(0.0, min(next_tick, state.next_deadline()) - state.clock())
            got = self.transport.recv(min(timeout, 0.2))
            handled = 0
            while got is not None:
                peer, data = got
                self._send(state.handle(peer, data))
                handled += 1
                if handled >= MAX_BATCH:
                    break
                got = self.transport.recv(0)
            if journal is not None:
                journal.maybe_sync()
        self.log.info("broker stopping", counters=dict(state.counters))

    def close(self) -> None:
        self.transport.close()
        if self.state.buffer.journal is not None:
            self.state.buffer.journal.close()
