"""Transports: ZeroMQ ROUTER/DEALER on loopback (with and without CURVE) and the in-process hub."""

from __future__ import annotations

import zmq
import zmq.auth
from test_broker_helpers import free_port

from tether.common.transport import (
    InProcHub,
    ZmqClientTransport,
    ZmqServerTransport,
    load_client_keys,
    load_server_keys,
)


def _echo_once(server, timeout=5.0):
    got = server.recv(timeout)
    assert got is not None and got.credential is None
    assert server.send(got.peer, b"echo:" + got.data)
    return got.peer


def test_zmq_round_trip_sees_distinct_peer_identities():
    server = ZmqServerTransport(f"tcp://127.0.0.1:{free_port()}")
    a, b = ZmqClientTransport(server.endpoint), ZmqClientTransport(server.endpoint)
    try:
        assert a.send(b"from-a") and b.send(b"from-b")
        peers = {_echo_once(server), _echo_once(server)}
        assert len(peers) == 2
        assert a.recv(5) == b"echo:from-a" and b.recv(5) == b"echo:from-b"
        assert a.recv(0.05) is None
    finally:
        a.close(), b.close(), server.close()


def test_zmq_server_reports_multiframe_messages_as_malformed():
    server = ZmqServerTransport(f"tcp://127.0.0.1:{free_port()}")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(server.endpoint)
    try:
        raw.send_multipart([b"one", b"two"])
        got = server.recv(5)
        assert got is not None and got.data is None
    finally:
        raw.close(0), ctx.term(), server.close()


def test_zmq_max_message_size_disconnects_the_sender_only():
    server = ZmqServerTransport(f"tcp://127.0.0.1:{free_port()}", max_message_bytes=4096)
    big, good = ZmqClientTransport(server.endpoint), ZmqClientTransport(server.endpoint)
    try:
        big.send(b"x" * 100_000)
        good.send(b"small")
        got = server.recv(5)
        assert got is not None and got.data == b"small"
        assert server.recv(0.3) is None  # the oversized frame never reached the application
    finally:
        big.close(), good.close(), server.close()


def _make_keys(tmp_path):
    from tether.broker.keys import make_keys

    make_keys(tmp_path, {"actor": ["good"]})
    zmq.auth.create_certificates(str(tmp_path / "clients"), "stranger")  # never authorized


def test_curve_admits_authorised_keys_names_them_and_refuses_others(tmp_path):
    _make_keys(tmp_path)
    keys = load_server_keys(tmp_path)
    server = ZmqServerTransport(f"tcp://127.0.0.1:{free_port()}", curve=keys)
    good = ZmqClientTransport(server.endpoint, curve=load_client_keys(tmp_path, "good"))
    stranger = ZmqClientTransport(server.endpoint, curve=load_client_keys(tmp_path, "stranger"))
    try:
        stranger.send(b"let me in")
        good.send(b"hello")
        got = server.recv(5)
        assert got is not None and got.data == b"hello"
        assert keys.key_roles[got.credential] == frozenset({"actor"})  # the key it proved it holds
        # The stranger's handshake was refused by ZAP: its message is never delivered.
        assert server.recv(1.0) is None
    finally:
        good.close(), stranger.close(), server.close()


def test_inproc_round_trip_and_drop_when_full():
    hub = InProcHub(hwm=2)
    server = hub.server()
    c = hub.client()
    assert c.send(b"a") and c.send(b"b") and not c.send(b"c")  # third is dropped at the bound
    got = server.recv(1)
    assert (got.peer, got.data, got.credential) == (c.identity, b"a", None)
    assert server.send(got.peer, b"reply") and c.recv(1) == b"reply"
    c.close()
    assert not server.send(got.peer, b"gone")
