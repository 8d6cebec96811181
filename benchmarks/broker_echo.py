"""A bare ZeroMQ stand-in for the broker: the transport's ceiling for benchmarks/bench_broker.py.

    python -m benchmarks.broker_echo --port PORT [--group-size 8]

It binds the broker's own server transport (tether.common.transport.ZmqServerTransport, the same
socket options) and answers what bench_broker's load processes send, doing nothing else: a Hello
or a StatusRequest gets a Welcome, a SubmitRollouts an Ack of `--group-size` ids carrying the
message's msg_id (the envelope is decoded and checked as the broker does first, the body is not),
anything else no answer (the load's learner then leases nothing). Rollouts/s against it, with the
broker pinned to the same CPUs, is what receiving the bytes and answering costs before the broker
does any work: the broker's row divided by this one is the share of the transport's ceiling the
broker reaches.
"""

from __future__ import annotations

import argparse
import signal
import threading

from tether.common import wire
from tether.common.messages import Ack, Welcome
from tether.common.transport import ZmqServerTransport


def serve(port: int, group_size: int, stop: threading.Event) -> int:
    """Answer until `stop` is set; returns the SubmitRollouts messages answered."""
    transport = ZmqServerTransport(f"tcp://127.0.0.1:{port}")
    ids = [f"r{i}" for i in range(group_size)]
    welcome = Welcome(broker_incarnation="echo", latest_version=0, lineage="", ready=True)
    answered = 0
    try:
        while not stop.is_set():
            got = transport.recv(0.2)
            while got is not None:
                envelope = wire.decode_envelope(got.data)  # as the broker does first
                if envelope.kind == "submit_rollouts":
                    transport.send(got.peer, wire.encode(Ack(acked=ids), sender="broker", msg_id=envelope.msg_id))
                    answered += 1
                elif envelope.kind in ("hello", "status_request"):
                    transport.send(got.peer, wire.encode(welcome, sender="broker", msg_id=envelope.msg_id))
                got = transport.recv(0)
    finally:
        transport.close()
    return answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=8, help="ids per Ack (rollouts per message)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(args.port, args.group_size, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
