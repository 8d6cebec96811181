"""Broker configuration: endpoints, liveness, the rollout buffer and security."""

from __future__ import annotations

from dataclasses import dataclass

from tether.common.config.base import Section


@dataclass(kw_only=True)
class BrokerConfig(Section):
    """The broker daemon: endpoints, liveness, the rollout buffer and security."""

    SECTION = "broker"

    host: str = "127.0.0.1"
    """Address the broker binds and peers connect to."""
    port: int = 5555
    """ZeroMQ ROUTER port for control and rollout traffic."""
    store_port: int = 29555
    """TCP port of the torch.distributed store for the weight group."""
    heartbeat_interval_s: float = 1.0
    """Seconds between a peer's heartbeats."""
    peer_timeout_s: float = 10.0
    """A peer silent this long is declared dead."""
    buffer_capacity: int = 4096
    """Rollouts held at most; beyond it actors get backpressure, never a silent drop."""
    journal_path: str = ""
    """Append-only journal of acked rollouts; empty disables it."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Larger messages are refused by the socket and the decoder."""
    curve_enabled: bool = False
    """Require ZeroMQ CURVE authentication (keys from `tether keys`)."""
    keys_dir: str = ""
    """Directory with server and authorized client keys when curve_enabled."""
    update_timeout_s: float = 60.0
    """A weight update not acked by every actor in this time re-forms the group without them."""
    journal_fsync: str = "interval"
    """always: fsync before every ack; interval: at most every journal_fsync_interval_s; never: leave it
    to the OS. Acks always follow the write() call, so a killed broker process loses nothing acked; only
    a machine crash can lose the un-fsynced tail."""
    journal_fsync_interval_s: float = 1.0
    """Seconds between fsyncs of the journal when journal_fsync=interval."""
    dedup_window: int = 1_000_000
    """Consumed rollout ids remembered for de-duplication (oldest forgotten first)."""
    max_peers: int = 1024
    """Registered peers at most; a Hello beyond it is refused, so random ids cannot exhaust memory."""
    curve_client_name: str = "client"
    """Client key pair peers use with CURVE: <keys_dir>/clients/<name>.key_secret."""
    host_store: bool = True
    """Host the torch.distributed TCPStore for the weight group at host:store_port."""
    send_hwm: int = 1000
    """ZeroMQ high-water mark per peer; beyond it messages to a slow peer are dropped, not queued."""

    def __post_init__(self) -> None:
        for key in ("port", "store_port"):
            self.require(0 < getattr(self, key) < 65536, key, "must be a TCP port")
        self.require(self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
        self.require(
            self.peer_timeout_s > self.heartbeat_interval_s, "peer_timeout_s", "must exceed heartbeat_interval_s"
        )
        self.require(self.buffer_capacity >= 1, "buffer_capacity", "must be >= 1")
        self.require(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        self.require(self.update_timeout_s > 0, "update_timeout_s", "must be > 0")
        self.require_choice("journal_fsync", ("always", "interval", "never"))
        self.require(self.journal_fsync_interval_s > 0, "journal_fsync_interval_s", "must be > 0")
        self.require(self.dedup_window >= 0, "dedup_window", "must be >= 0")
        self.require(self.max_peers >= 1, "max_peers", "must be >= 1")
        self.require(bool(self.curve_client_name), "curve_client_name", "must not be empty")
        self.require(self.send_hwm >= 1, "send_hwm", "must be >= 1")
        self.require(not self.curve_enabled or bool(self.keys_dir), "keys_dir", "is required when curve_enabled")
