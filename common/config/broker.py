"""Broker configuration: endpoints, liveness, the rollout buffer and security."""

from __future__ import annotations

from dataclasses import dataclass

from tether.common.config.base import Section


@dataclass(kw_only=True)
class BrokerConfig(Section):
    """The broker daemon: endpoints, liveness, the rollout buffer and security."""

    SECTION = "broker"

    host: str = "127.0.0.1"
    """Address peers connect to (the broker's advertised address; also where it binds unless
    bind_host is set)."""
    bind_host: str = ""
    """Address the broker's sockets (ZeroMQ and the weight-group store) bind to; empty: `host`.
    0.0.0.0 listens on every interface while `host` names the routable address peers use."""
    port: int = 5555
    """ZeroMQ ROUTER port for control and rollout traffic."""
    store_port: int = 29555
    """TCP port of the torch.distributed store for the weight group."""
    heartbeat_interval_s: float = 1.0
    """Seconds between a peer's heartbeats."""
    peer_timeout_s: float = 10.0
    """A peer silent this long is declared dead."""
    connect_timeout_s: float = 600.0
    """How long a daemon waits for the broker to answer its first Hello before giving up (daemons
    may start before the broker; they retry until then)."""
    buffer_capacity: int = 4096
    """Rollouts held at most; beyond it actors get backpressure, never a silent drop."""
    journal_path: str = "auto"
    """Append-only journal of the rollout ledger and version book. auto: <run.dir>/broker/journal.bin.
    Empty disables it: a broker restart then loses buffered and leased rollouts, so exactly-once
    delivery holds only while the broker lives."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Larger messages are refused by the socket and the decoder."""
    curve_enabled: bool = False
    """Require ZeroMQ CURVE authentication (keys from `tether keys`)."""
    keys_dir: str = ""
    """Directory with server and authorized client keys when curve_enabled."""
    update_timeout_s: float = 90.0
    """A weight update not reported by every member in this time ends; silent actors are left out
    of later updates until they register again. Must exceed weights.timeout_s, so members stuck in
    a collective fail by themselves first."""
    journal_fsync: str = "interval"
    """always: fsync before every ack; interval: at most every journal_fsync_interval_s, in the
    background (the broker serves on while the disk catches up); never: leave it to the OS. Acks
    always follow the write() call, so a killed broker process loses nothing acked; only a machine
    crash can lose the un-fsynced tail."""
    journal_fsync_interval_s: float = 1.0
    """Seconds between fsyncs of the journal when journal_fsync=interval."""
    journal_compact_every: int = 0
    """Rewrite the journal (in a background thread; acks go on) after this many rollouts were consumed or
    dropped since the last rewrite. 0: max(4 x buffer_capacity, dedup_window); -1: never (the journal then
    keeps the whole history, which an exactly-once audit reads)."""
    dedup_window: int = 100_000
    """Consumed or dropped rollout ids remembered for de-duplication, across restarts too (oldest
    forgotten first). Resends arrive within seconds; this covers far more than that."""
    incomplete_group_ttl_s: float = 60.0
    """An incomplete group whose actor is dead and whose last member arrived this long ago is
    dropped (counted as dropped stale): nobody will ever complete it."""
    max_peers: int = 1024
    """Registered peers at most; a Hello beyond it is refused, so random ids cannot exhaust memory."""
    curve_client_name: str = ""
    """Client key pair a daemon uses with CURVE: <keys_dir>/clients/<name>.key_secret. Empty: the
    daemon's role (actor, learner or tool), as `tether keys` names them."""
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
        self.require(self.connect_timeout_s > 0, "connect_timeout_s", "must be > 0")
        self.require(self.incomplete_group_ttl_s > 0, "incomplete_group_ttl_s", "must be > 0")
        self.require_choice("journal_fsync", ("always", "interval", "never"))
        self.require(self.journal_fsync_interval_s > 0, "journal_fsync_interval_s", "must be > 0")
        self.require(self.journal_compact_every >= -1, "journal_compact_every", "must be >= -1")
        self.require(self.dedup_window >= 0, "dedup_window", "must be >= 0")
        self.require(self.max_peers >= 1, "max_peers", "must be >= 1")
        self.require(self.send_hwm >= 1, "send_hwm", "must be >= 1")
        self.require(not self.curve_enabled or bool(self.keys_dir), "keys_dir", "is required when curve_enabled")

    @property
    def listen_host(self) -> str:
        """Where the broker's sockets bind."""
        return self.bind_host or self.host
