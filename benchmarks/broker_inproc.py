"""The broker's own work per rollout, without sockets: BrokerState driven in this process.

The same pre-encoded SubmitRollouts messages as the socket benchmark (benchmarks/broker_load.py)
go straight into `BrokerState.handle`, as the server loop (broker/server.py) would pass them, with
a learner leasing and committing batches and every reply encoded as the server encodes it. The
thread CPU time per rollout is the Python cost of the broker alone: it does not depend on how many
cores the load generator takes on a shared machine, which makes it the number to compare before
and after a change. `--profile FILE` writes a cProfile of the run.

    python -m benchmarks.broker_inproc [--rollouts 20000] [--repeat 3] [--journal on,off] [--parked] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import tempfile
import time
from pathlib import Path

from benchmarks.broker_load import LoadSpec, submit_template
from tether.broker.server import MAX_BATCH, build_state
from tether.broker.state import RunPolicy
from tether.common import wire
from tether.common.config.broker import BrokerConfig
from tether.common.logging import configure_logging
from tether.common.messages import BatchRequest, Commit, GenerationRequest, Hello


def run(*, rollouts: int = 20_000, actors: int = 64, group_size: int = 8, tokens: int = 1000, batch: int = 512,
        journal: bool = True, vocab_size: int = 32000, parked: bool = False, profile: str = "") -> dict:
    """Feed `rollouts` rollouts through one BrokerState; returns CPU and wall seconds per rollout.

    `parked`: every actor also keeps a GenerationRequest parked, as actor daemons do while they
    wait for room (the broker then looks at admission after every message)."""
    with tempfile.TemporaryDirectory(prefix="bench-broker-inproc-") as tmp:
        cfg = BrokerConfig(host_store=False, buffer_capacity=actors * group_size * 4 + 16 * batch,
                           journal_path=str(Path(tmp) / "journal.bin") if journal else "", peer_timeout_s=3600.0)
        policy = RunPolicy(rollouts_per_step=batch, group_size=group_size, max_tokens=tokens, max_lag=4,
                           vocab_size=vocab_size)
        state = build_state(cfg, policy)
        spec = LoadSpec(port=0, group_size=group_size, tokens=tokens, prompt_tokens=128, vocab_size=vocab_size,
                        window=1, rate=0.0)
        ids = [f"actor-{i}" for i in range(actors)]
        for actor_id in ids:
            state.handle(actor_id.encode(), wire.encode(Hello(peer_id=actor_id, role="actor", incarnation="x"),
                                                        sender=actor_id))
            if parked:
                state.handle(actor_id.encode(), wire.encode(GenerationRequest(seq=1, groups=1 << 16), sender=actor_id))
        learner = b"learner-0"
        state.handle(learner, wire.encode(Hello(peer_id="learner-0", role="learner", incarnation="x", session="s1"),
                                          sender="learner-0"))
        parts = [submit_template(a, spec, i) for i, a in enumerate(ids)]
        messages = rollouts // group_size
        seq = 0
        leased = 0

        def request() -> None:
            nonlocal seq, leased
            seq += 1
            for out in state.handle(learner, wire.encode(BatchRequest(rank=0, seq=seq, size=batch, learner_version=0,
                                                                      max_lag=1 << 20), sender="learner-0")):
                on_reply(out)

        def on_reply(out) -> None:
            nonlocal leased
            out.encode()
            if out.peer == learner and out.body.KIND == "rollout_batch":
                leased += len(out.body.rollouts)
                for reply in state.handle(learner, wire.encode(Commit(version=1), sender="learner-0")):
                    reply.encode()
                request()

        prof = cProfile.Profile() if profile else None
        request()
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        for n in range(messages):
            i = n % actors
            data = (b"%012d" % (n // actors + 1)).join(parts[i])
            for out in state.handle(ids[i].encode(), data):
                on_reply(out)
            if state.ledger.journal is not None and n % MAX_BATCH == 0:
                state.ledger.journal.maybe_sync()
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        if state.ledger.journal is not None:
            state.ledger.journal.close()
        stored = state.ledger.stored_total
        if stored != messages * group_size:
            raise RuntimeError(f"stored {stored} of {messages * group_size} rollouts: {state.counters}")
    return {"journal": journal, "parked_requests": parked, "rollouts": stored, "leased": leased, "cpu_us_per_rollout": 1e6 * cpu / stored,
            "wall_us_per_rollout": 1e6 * wall / stored, "rollouts_per_cpu_s": stored / cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=20_000)
    parser.add_argument("--journal", default="on,off")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the table shows the fastest")
    parser.add_argument("--parked", action="store_true", help="every actor keeps a GenerationRequest parked")
    parser.add_argument("--profile", default="", help="cProfile output file (journal on only)")
    args = parser.parse_args(argv)
    configure_logging(component="broker", level="warning")  # as the benchmark's daemon runs
    for journal in args.journal.split(","):
        runs = [run(rollouts=args.rollouts, journal=journal == "on", parked=args.parked,
                    profile=args.profile if journal == "on" else "")
                for _ in range(args.repeat)]
        # The fastest run is the least disturbed by other work on a shared machine.
        cpu = sorted(r["cpu_us_per_rollout"] for r in runs)
        print(f"journal {journal:3}: {cpu[0]:6.1f} us CPU/rollout (fastest of {len(runs)}; median {cpu[len(cpu) // 2]:.1f})"
              f" = {1e6 / cpu[0]:.0f} rollouts per CPU-second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
