"""The broker daemon as a real subprocess on loopback ZeroMQ: liveness, journal replay after
kill -9, fuzzing, CURVE, the weight-group store and `tether status` / `tether keys`."""

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

from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.messages import Hello
from tether.common.peer import BrokerClient, BrokerError

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
                with self.client("probe") as c:
                    c.status(timeout=1.0)
                return self
            except BrokerError:
                assert time.monotonic() < deadline, "broker did not come up"

    def broker_cfg(self) -> BrokerConfig:
        kw = {}
        for key, value in self.cfg_overrides.items():
            field_type = type(getattr(BrokerConfig(), key))
            kw[key] = value.lower() == "true" if field_type is bool else field_type(value)
        return BrokerConfig(**kw)

    def client(self, peer_id: str, role: str = "actor", **kw) -> BrokerClient:
        kw.setdefault("resend_interval_s", 0.3)
        return BrokerClient.from_config(self.broker_cfg(), peer_id=peer_id, role=role, heartbeat_interval_s=0.2, **kw)

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
    a0 = d.client("a0").start()
    a1 = d.client("a1").start()
    with d.client("watcher", role="tool") as watcher:
        a0.hello(loaded_version=0)
        a1.hello(loaded_version=0)
        alive = lambda: {p.peer_id: p.alive for p in watcher.status().peers}  # noqa: E731
        assert alive() == {"a0": True, "a1": True}
        a1.close()  # silent from now on: no goodbye, like a crashed process
        assert wait_for(lambda: alive() == {"a0": True, "a1": False})
        assert alive()["a0"]  # the live peer is unaffected
    a0.close()


def test_acked_unconsumed_rollouts_survive_kill_9(daemon, tmp_path):
    journal = tmp_path / "journal.log"
    d = daemon(f"broker.journal_path={journal}", "broker.journal_fsync=never")
    with d.client("a0") as a0, d.client("L0", role="learner") as learner:
        a0.hello(loaded_version=0)
        learner.hello()
        a0.send_rollouts([make_rollout(f"r{i}", f"g{i}", tokens=50) for i in range(5)])
        assert a0.flush(timeout=20)
        taken = learner.request_batch(rank=0, size=2, learner_version=0, max_lag=4, timeout=20)
        assert taken is not None and len(taken.rollouts) == 2
    d.kill9()
    d2 = daemon(f"broker.journal_path={journal}")
    with d2.client("L0", role="learner") as learner:
        learner.hello()
        rest = learner.request_batch(rank=0, size=3, learner_version=0, max_lag=4, timeout=20)
        assert rest is not None
        consumed = {r.rollout_id for r in taken.rollouts}
        assert {r.rollout_id for r in rest.rollouts} == {f"r{i}" for i in range(5)} - consumed
        with d2.client("tool", role="tool") as tool:
            assert tool.status().buffer_depth == 0


def test_fuzzing_leaves_the_broker_serving_others(daemon):
    d = daemon("broker.max_message_bytes=65536")
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(f"tcp://127.0.0.1:{d.port}")
    rng = __import__("random").Random(0)
    try:
        bad = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))) for _ in range(200)]
        bad.append(msgspec.msgpack.encode({"kind": "hello", "schema": 99, "sender": "x", "msg_id": "m", "body": {}}))
        bad.append(msgspec.msgpack.encode({"kind": "zzz", "schema": 1, "sender": "x", "msg_id": "m", "body": {}}))
        bad.append(wire.encode(Hello(peer_id="x", role="actor"), sender="x")[:-3])
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
        with d.client("a0") as good:
            assert good.hello(loaded_version=0).peers[0].peer_id == "a0"
            good.send_rollouts([make_rollout("ok")])
            assert good.flush(timeout=20)
        assert d.proc.poll() is None
    finally:
        evil.close(0)
        ctx.term()


def test_curve_refuses_a_client_with_an_unknown_key(daemon, tmp_path):
    from tether.broker.keys import main as keys_main

    keys = tmp_path / "keys"
    assert keys_main([str(keys), "--clients", "client"]) == 0
    d = daemon("broker.curve_enabled=true", f"broker.keys_dir={keys}")
    with d.client("a0") as good:
        assert good.hello(loaded_version=0, timeout=20).peers
    # A client with a valid-looking key pair that the broker never authorised.
    assert keys_main([str(tmp_path / "other"), "--clients", "client"]) == 0
    cfg = d.broker_cfg()
    cfg.keys_dir = str(tmp_path / "other")
    with BrokerClient.from_config(cfg, peer_id="intruder", role="actor") as bad, pytest.raises(BrokerError):
        bad.hello(timeout=2.0)
    with d.client("a1") as good:
        assert {p.peer_id for p in good.hello(loaded_version=0).peers} == {"a0", "a1"}


def test_store_is_hosted_and_status_cli_prints_the_table(daemon, capsys):
    from datetime import timedelta

    import torch.distributed as dist

    from tether.broker.status import main as status_main

    store_port = free_port()
    d = daemon("broker.host_store=true", f"broker.store_port={store_port}")
    client_store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=20))
    prefixed = dist.PrefixStore("weights/epoch-1", client_store)
    prefixed.set("k", "v")
    assert prefixed.get("k") == b"v"
    with d.client("a0").start() as a0:
        a0.hello(loaded_version=0)
        assert status_main([f"broker.port={d.port}"]) == 0
    out = capsys.readouterr().out
    assert "a0" in out and "actor" in out and "latest version 0" in out
