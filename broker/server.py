"""The broker's server loop: moves bytes between a ServerTransport and a BrokerState.

Single-threaded on purpose: the state needs no locks, and every send is non-blocking (a peer that
does not read has its messages dropped at the high-water mark and recovers through resends), so no
peer can stall the loop for the others. Messages are handled in arrival order, at most
`MAX_BATCH` between two `tick`s so time-driven rules run even under a flood.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

from tether.broker.journal import Journal
from tether.broker.ledger import Ledger
from tether.broker.state import BrokerState, Outgoing, RunPolicy
from tether.common.config.broker import BrokerConfig
from tether.common.logging import get_logger
from tether.common.transport import ServerTransport, ZmqServerTransport, load_server_keys

MAX_BATCH = 256
# libzmq must let a frame a little over the decoder's limit through so the decoder can answer
# "too_large" with an Error; frames far beyond it are cut off by libzmq itself.
ZMQ_SIZE_SLACK = 64 * 1024


def build_state(cfg: BrokerConfig, policy: RunPolicy | None = None, clock=time.monotonic,
                key_roles: dict[str, frozenset[str]] | None = None) -> BrokerState:
    """A BrokerState with its ledger, replaying the journal when one is configured."""
    journal = None
    if cfg.journal_path:
        journal = Journal(cfg.journal_path, fsync=cfg.journal_fsync, fsync_interval_s=cfg.journal_fsync_interval_s,
                          clock=clock)
    compact_every = None if cfg.journal_compact_every == -1 else cfg.journal_compact_every
    ledger = Ledger(cfg.buffer_capacity, dedup_window=cfg.dedup_window, journal=journal, clock=clock,
                    compact_every=compact_every)
    return BrokerState(cfg, policy, ledger=ledger, clock=clock, key_roles=key_roles)


def build_transport(cfg: BrokerConfig) -> ZmqServerTransport:
    curve = load_server_keys(cfg.keys_dir) if cfg.curve_enabled else None
    return ZmqServerTransport(
        f"tcp://{cfg.listen_host}:{cfg.port}",
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
        self._store_socket: socket.socket | None = None

    def start_store(self) -> None:
        """Host the torch.distributed TCPStore every weight-group epoch rendezvouses on.

        The listening socket is bound here, to broker.bind_host (or host), and handed to the store:
        torch would otherwise listen on every interface.
        """
        import torch.distributed as dist

        family = socket.AF_INET6 if ":" in self.cfg.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.listen_host, self.cfg.store_port))
        sock.listen(1024)
        self._store_socket = sock
        self.store = dist.TCPStore(
            self.cfg.host, self.cfg.store_port, is_master=True, wait_for_workers=False,
            master_listen_fd=sock.fileno(), timeout=timedelta(seconds=max(self.cfg.update_timeout_s, 30.0)),
        )
        self.log.info("weight-group store listening", bind=self.cfg.listen_host, advertised=self.cfg.host,
                      port=self.cfg.store_port)

    def stop(self) -> None:
        self._stop.set()

    def _send(self, out: list[Outgoing]) -> None:
        for item in out:
            if not self.transport.send(item.peer, item.encode()):
                self.state.counters["send_dropped"] = self.state.counters.get("send_dropped", 0) + 1

    def serve_forever(self) -> None:
        state = self.state
        journal = state.ledger.journal
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
                self._send(state.handle(got.peer, got.data, got.credential))
                handled += 1
                if handled >= MAX_BATCH:
                    break
                got = self.transport.recv(0)
            if journal is not None:
                journal.maybe_sync()
        self.log.info("broker stopping", counters=dict(state.counters), **state.ledger.counters(),
                      buffered=state.ledger.depth, leased=state.ledger.leased)

    def close(self) -> None:
        self.transport.close()
        if self.state.ledger.journal is not None:
            self.state.ledger.journal.close()
        if self._store_socket is not None:
            self._store_socket.close()
