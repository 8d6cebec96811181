"""The broker daemon as a real subprocess on loopback ZeroMQ: liveness, the ledger across kill -9,
fuzzing, CURVE with keys bound to roles, the weight-group store and `tether status` / `tether keys`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import zmq
from test_broker_helpers import free_port, make_rollout

from tether.actor.broker_link import ActorLink
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import Hello, StatusRequest
from tether.common.peer import BrokerConnection, BrokerError
from tether.learner.broker_link import LearnerLink

pytestmark = pytest.mark.slow


class Daemon:
    def __init__(self, tmp_path, *overrides: str) -> None:
        self.port = free_port()
        self.run_dir = tmp_path / "run"
        self.overrides = [
            f"broker.port={self.port}", "broker.host_store=false", f"run.dir={self.run_dir}",
            "broker.heartbeat_interval_s=0.2", "broker.peer_timeout_s=1.5", "run.log_level=warning", *overrides,
        ]
        self.cfg_overrides = {k.split("=")[0].split(".", 1)[1]: k.split("=", 1)[1] for k in self.overrides
                              if k.startswith("broker.")}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tether.broker", *self.overrides], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                self.status(timeout=1.0)
                return self
            except BrokerError:
                assert time.monotonic() < deadline, "broker did not come up"

    def broker_cfg(self) -> BrokerConfig:
        kw = {}
        for key, value in self.cfg_overrides.items():
            field_type = type(getattr(BrokerConfig(), key))
            kw[key] = value.lower() == "true" if field_type is bool else field_type(value)
        return BrokerConfig(**kw)

    def connection(self, peer_id: str, role: str = "tool", cfg: BrokerConfig | None = None) -> BrokerConnection:
        return BrokerConnection.from_config(cfg or self.broker_cfg(), peer_id=peer_id, role=role,
                                            heartbeat_interval_s=0.2)

    def actor(self, peer_id: str, cfg: BrokerConfig | None = None) -> ActorLink:
        return ActorLink(self.connection(peer_id, "actor", cfg), resend_interval_s=0.3)

    def learner(self, rank: int = 0, session: str = "s1") -> LearnerLink:
        return LearnerLink(self.connection(f"L{rank}", "learner"), rank=rank, session=session,
                           version=lambda: 0, committed_version=lambda: -1, resend_interval_s=1.0)

    def status(self, timeout: float = 10.0):
        with self.connection(f"probe-{time.monotonic_ns()}") as c:
            return c.request(StatusRequest(), timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def daemon(tmp_path):
    started: list[Daemon] = []

    def make(*overrides: str) -> Daemon:
        d = Daemon(tmp_path, *overrides).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def wait_for(predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_join_leave_and_death_detection(daemon):
    d = daemon()
    a0, a1 = d.actor("a0"), d.actor("a1")
    a0.conn.start(), a1.conn.start()
    a0.register(timeout=20)
    a1.register(timeout=20)
    alive = lambda: {p.peer_id: p.alive for p in d.status().peers}  # noqa: E731
    assert alive() == {"a0": True, "a1": True}
    a1.conn.close()  # silent from now on: no goodbye, like a crashed process
    assert wait_for(lambda: alive() == {"a0": True, "a1": False})
    assert alive()["a0"]  # the live peer is unaffected
    a0.conn.close()


def test_acked_rollouts_survive_kill_9_and_a_lost_lease_is_served_again(daemon, tmp_path):
    journal = tmp_path / "journal.bin"
    d = daemon(f"broker.journal_path={journal}", "broker.journal_fsync=never", "actor.sampling.group_size=1")
    a0, l0 = d.actor("a0"), d.learner(session="s1")
    a0.conn.start(), l0.conn.start()
    l0.register(timeout=20)
    a0.register(timeout=20)
    a0.send_rollouts([make_rollout(f"r{i}", f"g{i}", tokens=16) for i in range(5)])
    assert a0.flush(timeout=20)
    l0.request_batch(size=2, learner_version=0, max_lag=4)
    taken = l0.poll_batch(timeout=20)
    assert taken is not None and len(taken.rollouts) == 2
    a0.conn.close(), l0.conn.close()
    d.kill9()  # the learner dies with it, before any checkpoint: the lease must come back
    d2 = daemon(f"broker.journal_path={journal}", "actor.sampling.group_size=1")
    assert d2.status().leased == 2 and d2.status().stored_total == 5
    fresh = d2.learner(session="s2")
    fresh.conn.start()
    try:
        fresh.register(timeout=20)
        fresh.request_batch(size=5, learner_version=0, max_lag=4)
        everything = fresh.poll_batch(timeout=20)
        assert everything is not None
        assert sorted(r.rollout_id for r in everything.rollouts) == [f"r{i}" for i in range(5)]
        # Served first: what the dead session had leased.
        assert {r.rollout_id for r in everything.rollouts[:2]} == {r.rollout_id for r in taken.rollouts}
    finally:
        fresh.conn.close()
    status = d2.status()
    assert status.stored_total == status.leased + status.buffer_depth + status.consumed_total + status.dropped_stale_total


def test_fuzzing_leaves_the_broker_serving_others(daemon):
    d = daemon("broker.max_message_bytes=65536", "actor.sampling.group_size=1")
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(f"tcp://127.0.0.1:{d.port}")
    rng = __import__("random").Random(0)
    try:
        bad = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))) for _ in range(200)]
        bad.append(msgspec.msgpack.encode({"kind": "hello", "schema": 99, "sender": "x", "msg_id": "m", "body": {}}))
        bad.append(msgspec.msgpack.encode({"kind": "zzz", "schema": 2, "sender": "x", "msg_id": "m", "body": {}}))
        bad.append(wire.encode(Hello(peer_id="x", role="actor", incarnation="i"), sender="x")[:-3])
        bad.append(b"\x00" * 70_000)  # over the decoder's limit, under libzmq's: answered too_large
        for blob in bad:
            evil.send(blob)
        evil.send_multipart([b"a", b"b"])
        codes = []
        while evil.poll(3000):
            codes.append(wire.decode(evil.recv()).body.code)
            if len(codes) == len(bad) + 1:
                break
        assert len(codes) == len(bad) + 1
        assert {"malformed", "schema_mismatch", "unknown_kind", "too_large"} <= set(codes)
        evil.send(b"\x00" * 10_000_000)  # far past MAXMSGSIZE: libzmq drops the connection
        good = d.actor("a0")
        try:
            assert good.register(timeout=20).ready
            good.send_rollouts([make_rollout("ok")])
            assert good.flush(timeout=20)
        finally:
            good.conn.close()
        assert d.proc.poll() is None
    finally:
        evil.close(0)
        ctx.term()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_curve_admits_known_keys_in_their_role_only_and_the_store_binds_to_the_broker_address(daemon, tmp_path):
    from tether.broker.keys import main as keys_main

    keys = tmp_path / "keys"
    assert keys_main([str(keys)]) == 0  # one key per role: actor, learner, tool
    store_port = free_port()
    d = daemon("broker.curve_enabled=true", f"broker.keys_dir={keys}", "broker.host_store=true",
               f"broker.store_port={store_port}")
    good = d.actor("a0")
    try:
        assert good.register(timeout=20).ready
    finally:
        good.conn.close()
    # A known key claiming another role is refused.
    cfg = d.broker_cfg()
    cfg.curve_client_name = "actor"
    posing = LearnerLink(d.connection("L0", "learner", cfg), rank=0, session="s", version=lambda: 0,
                         committed_version=lambda: -1)
    with pytest.raises(BrokerError) as info:
        posing.register(timeout=10)
    assert info.value.code == "forbidden"
    posing.conn.close()
    # A valid-looking key pair that the broker never authorised never completes the handshake.
    assert keys_main([str(tmp_path / "other")]) == 0
    cfg = d.broker_cfg()
    cfg.keys_dir = str(tmp_path / "other")
    intruder = d.actor("intruder", cfg)
    with pytest.raises(BrokerError):
        intruder.register(timeout=2.0)
    intruder.conn.close()
    # The weight-group store listens on the broker's address only, not on every interface.
    assert _listening_addresses(store_port) == {"127.0.0.1"}


def test_store_is_hosted_and_status_cli_prints_the_table(daemon, capsys):
    from datetime import timedelta

    import torch.distributed as dist

    from tether.broker.status import main as status_main

    store_port = free_port()
    d = daemon("broker.host_store=true", f"broker.store_port={store_port}")
    client_store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=20))
    prefixed = dist.PrefixStore("weights/x/epoch-1", client_store)
    prefixed.set("k", "v")
    assert prefixed.get("k") == b"v"
    a0 = d.actor("a0")
    a0.conn.start()
    try:
        a0.register(timeout=20)
        assert status_main([f"broker.port={d.port}"]) == 0
    finally:
        a0.conn.close()
    out = capsys.readouterr().out
    assert "a0" in out and "actor" in out and "latest version 0" in out
