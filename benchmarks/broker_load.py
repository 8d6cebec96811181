"""Load generators for benchmarks/bench_broker.py: simulated actors and a draining learner.

Both speak the wire protocol over raw ZeroMQ DEALER sockets on loopback, without tether's client
classes, so that what the benchmark measures is the broker and not a Python client:

- `actor_process` drives many actors from one thread, one socket each. Every actor's
  SubmitRollouts message is encoded once before the clock starts, with a placeholder where the
  per-message counter goes (rollout ids, group id, envelope msg_id); sending a message is one
  `bytes.join` and one `send`. Each actor keeps at most `window` messages in flight; in paced mode
  the process also spaces its sends to offer a fixed rate.
- `learner_process` leases batches (BatchRequest) on several ranks and commits (Commit, version 1:
  every lease of step 0 becomes consumed), so the buffer never fills and the ledger sees the full
  life of a rollout. It counts rollouts without decoding them (msgspec.Raw).

Every process reports the CPU time it used inside the measurement window, so the table can say how
much of the machine the load itself took.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq

from tether.common import wire
from tether.common.messages import (
    Ack,
    BatchRequest,
    Commit,
    Hello,
    Rollout,
    SamplingSpec,
    StatusRequest,
    SubmitRollouts,
    float32_array,
    int32_array,
)

# Stands for the 12-digit message counter in an encoded template; "~" is 0x7e, which the random
# arrays below cannot produce twelve times in a row by chance (checked when the template is built).
PLACEHOLDER = "~" * 12
ENDPOINT = "tcp://127.0.0.1:{port}"
# After the window closes, keep reading acks this long, so messages sent late in the window still
# get their latency recorded (and the learner keeps draining meanwhile).
DRAIN_S = 2.0


@dataclass(frozen=True)
class LoadSpec:
    """What every actor sends (shared by all load processes)."""

    port: int
    group_size: int
    """Rollouts per SubmitRollouts message: one whole group, as actor daemons send them."""
    tokens: int
    """Completion tokens per rollout."""
    prompt_tokens: int
    vocab_size: int
    window: int
    """Messages in flight per actor at most."""
    rate: float
    """Rollouts/s this process offers (paced mode); 0: send whenever the window allows (saturate)."""


class _Envelope(msgspec.Struct):
    kind: str
    msg_id: str
    body: msgspec.Raw


class _BatchCount(msgspec.Struct):
    """Just enough of a RolloutBatch to count it; the rollouts stay undecoded."""

    rollouts: list[msgspec.Raw]


_envelope = msgspec.msgpack.Decoder(_Envelope)
_ack = msgspec.msgpack.Decoder(Ack)
_batch = msgspec.msgpack.Decoder(_BatchCount)


def make_rollout(rollout_id: str, group_id: str, spec: LoadSpec, actor_id: str, rng: np.random.Generator) -> Rollout:
    """A rollout the broker accepts under the benchmark's run overrides (version 0 throughout)."""
    return Rollout(
        rollout_id=rollout_id, group_id=group_id, group_size=spec.group_size, actor_id=actor_id, task="bench",
        prompt_token_ids=int32_array(rng.integers(0, spec.vocab_size, spec.prompt_tokens)),
        completion_token_ids=int32_array(rng.integers(0, spec.vocab_size, spec.tokens)),
        logprobs=float32_array(-rng.exponential(1.0, spec.tokens)),
        versions=int32_array(np.zeros(spec.tokens)),
        reward=1.0, sampling=SamplingSpec(temperature=1.0, max_tokens=spec.tokens), finish_reason="length",
    )


def submit_template(actor_id: str, spec: LoadSpec, seed: int) -> list[bytes]:
    """The actor's SubmitRollouts envelope split at every placeholder: `b"%012d" % n` joined
    between the parts is message n, with rollout ids `<actor>-<n>-<i>`, group `<actor>-<n>` and
    msg_id `<n>` (so an Ack names the message it answers)."""
    rng = np.random.default_rng(seed)
    group_id = f"{actor_id}-{PLACEHOLDER}"
    body = SubmitRollouts(rollouts=[make_rollout(f"{group_id}-{i}", group_id, spec, actor_id, rng)
                                    for i in range(spec.group_size)])
    data = wire.encode(body, sender=actor_id, msg_id=PLACEHOLDER)
    parts = data.split(PLACEHOLDER.encode())
    if len(parts) != 2 * spec.group_size + 2:
        raise RuntimeError("placeholder collided with the payload; use another seed")
    return parts


def _hello(sock: zmq.Socket, peer_id: str, **fields) -> None:
    sock.send(wire.encode(Hello(peer_id=peer_id, incarnation=uuid.uuid4().hex, loaded_version=0, pid=os.getpid(),
                                **fields), sender=peer_id))


def _await_welcome(socks: list[zmq.Socket], timeout: float) -> None:
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    waiting = set(socks)
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} peers got no Welcome")
        for sock, _ in poller.poll(200):
            message = wire.decode(sock.recv())
            if message.kind != "welcome":
                raise RuntimeError(f"expected Welcome, got {message.kind}: {message.body}")
            waiting.discard(sock)


def wait_for_broker(port: int, alive, timeout: float = 60.0) -> None:
    """Until the broker answers a StatusRequest; raises when `alive()` turns false or on timeout."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ENDPOINT.format(port=port))
        sock.send(wire.encode(StatusRequest(), sender=f"probe-{uuid.uuid4().hex[:8]}"))
        ok = sock.poll(1000)
        sock.close()
        if ok:
            return
    raise TimeoutError("the broker did not answer")


def actor_process(spec: LoadSpec, actor_ids: list[str], seed: int, ready, go, out) -> None:
    """Drive `actor_ids` (one DEALER socket each) until the window (t0, t_end) from `go` closes."""
    ctx = zmq.Context()
    socks = []
    for actor_id in actor_ids:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ENDPOINT.format(port=spec.port))
        _hello(sock, actor_id, role="actor")
        socks.append(sock)
    _await_welcome(socks, 60.0)
    parts = [submit_template(a, spec, seed + i) for i, a in enumerate(actor_ids)]
    n = len(socks)
    inflight: list[dict[int, float]] = [{} for _ in range(n)]  # per actor: counter -> send time
    counter = [0] * n
    index = {s: i for i, s in enumerate(socks)}
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    latencies: list[float] = []
    acked = retried = invalid = errors = sent = window_full = 0
    first_error = ""
    ready.put(os.getpid())
    t0, t_end = go.get()
    cpu0 = cpu = None
    gap = spec.group_size / spec.rate if spec.rate > 0 else 0.0
    next_send = time.monotonic()
    turn = 0

    def send(i: int) -> None:
        nonlocal sent
        counter[i] += 1
        data = (b"%012d" % counter[i]).join(parts[i])
        inflight[i][counter[i]] = time.monotonic()  # per message: a pass over every actor takes a while
        socks[i].send(data, copy=False)
        sent += 1

    while True:
        now = time.monotonic()
        if cpu0 is None and now >= t0:
            cpu0 = time.process_time()
        if cpu is None and cpu0 is not None and now >= t_end:
            cpu = time.process_time() - cpu0
        if now >= t_end + DRAIN_S or (now >= t_end and not any(inflight)):
            break
        sending = now < t_end
        if sending and gap == 0.0:
            for i in range(n):
                while len(inflight[i]) < spec.window:
                    send(i)
        elif sending:
            if now - next_send > 0.05:  # fell behind (descheduled): do not burst to catch up
                next_send = now
            while next_send <= now:
                for k in range(n):
                    i = (turn + k) % n
                    if len(inflight[i]) < spec.window:
                        send(i)
                        turn = i + 1
                        break
                else:
                    window_full += 1
                next_send += gap
        # Paced: sleep until the next send is due, rounded up so the loop never spins.
        timeout_ms = 100 if gap == 0.0 or not sending else math.ceil(max(0.0, next_send - time.monotonic()) * 1000)
        for sock, _ in poller.poll(timeout_ms):
            i = index[sock]
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = time.monotonic()
                envelope = _envelope.decode(data)
                if envelope.kind != "ack":
                    errors += 1
                    first_error = first_error or f"{envelope.kind}: {bytes(envelope.body)[:300]!r}"
                    continue
                sent_at = inflight[i].pop(int(envelope.msg_id), None)
                ack = _ack.decode(envelope.body)
                if t0 <= got < t_end:
                    acked += len(ack.acked)
                    retried += len(ack.retry)
                    invalid += len(ack.invalid)
                if sent_at is not None and t0 <= sent_at < t_end:
                    latencies.append(got - sent_at)
                if ack.invalid and not first_error:
                    first_error = f"invalid: {ack.invalid[0].reason}"
    if cpu is None:
        cpu = time.process_time() - (cpu0 if cpu0 is not None else time.process_time())
    out.put({"role": "actors", "actors": n, "sent": sent, "acked": acked, "retry": retried, "invalid": invalid,
             "errors": errors, "first_error": first_error, "window_full": window_full, "cpu_s": cpu,
             "latencies": np.asarray(latencies, dtype=np.float64)})
    for s in socks:
        s.close()
    ctx.term()


def learner_process(port: int, batch_size: int, ranks: int, ready, go, stop, out) -> None:
    """Lease `batch_size` rollouts at a time on each of `ranks` learner ranks, until `stop` is set;
    rank 0 commits (version 1) after every batch it receives, consuming every lease so far.

    Several ranks keep several batch requests parked at once: the broker reads its peers' messages
    in turn, so one rank's request waits behind one message of every actor, and a single rank
    would drain no faster than the actors fill.
    """
    ctx = zmq.Context()
    socks = []
    for rank in range(ranks):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ENDPOINT.format(port=port))
        _hello(sock, f"learner-{rank}", role="learner", session="s1", rank=rank)
        socks.append(sock)
    _await_welcome(socks, 60.0)
    ready.put(os.getpid())
    t0, t_end = go.get()
    seq = [0] * ranks
    consumed = batches = commits = 0
    first_error = ""
    cpu0 = cpu = None
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)

    def request(rank: int) -> None:
        seq[rank] += 1
        socks[rank].send(wire.encode(BatchRequest(rank=rank, seq=seq[rank], size=batch_size, learner_version=0,
                                                  max_lag=1 << 20), sender=f"learner-{rank}"))

    for rank in range(ranks):
        request(rank)
    while not stop.is_set():
        now = time.monotonic()
        if cpu0 is None and now >= t0:
            cpu0 = time.process_time()
        if cpu is None and cpu0 is not None and now >= t_end:
            cpu = time.process_time() - cpu0
        for sock, _ in poller.poll(100):
            rank = socks.index(sock)
            envelope = _envelope.decode(sock.recv())
            if envelope.kind == "rollout_batch":
                n = len(_batch.decode(envelope.body).rollouts)
                if t0 <= time.monotonic() < t_end:
                    consumed += n
                    batches += 1
                request(rank)
                if rank == 0:
                    sock.send(wire.encode(Commit(version=1), sender="learner-0"))
            elif envelope.kind == "commit_ack":
                commits += 1
            else:
                first_error = first_error or f"{envelope.kind}: {bytes(envelope.body)[:300]!r}"
    if cpu is None:
        cpu = time.process_time() - (cpu0 if cpu0 is not None else time.process_time())
    out.put({"role": "learner", "leased": consumed, "batches": batches, "commits": commits, "cpu_s": cpu,
             "first_error": first_error})
    for sock in socks:
        sock.close()
    ctx.term()
