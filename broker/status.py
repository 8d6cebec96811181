"""`tether status`: the broker's view of the run as a table (one-shot, --watch, or --wait for readiness)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import msgspec

from tether.common.config import load_config_or_exit
from tether.common.messages import Status, StatusRequest
from tether.common.peer import BrokerConnection, BrokerError


def render(status: Status) -> str:
    """The Status as a plain-text table."""
    lines = [
        f"latest version {status.latest_version}   lineage {status.lineage or '-'}   epoch {status.epoch}   "
        f"committed {status.committed_version}   update {'in flight' if status.update_in_flight else 'idle'}",
        f"buffer {status.buffer_depth}   leased {status.leased}   granted groups {status.granted_groups}   "
        f"rollouts/s {status.rollouts_per_second:.1f}",
        f"books: stored {status.stored_total} = consumed {status.consumed_total} + dropped stale "
        f"{status.dropped_stale_total} + buffered {status.buffer_depth} + leased {status.leased}",
        "",
        f"{'peer':<28} {'role':<8} {'alive':<6} {'ready':<6} {'version':>7} {'lag':>5} {'seen (s)':>9}",
    ]
    for p in status.peers:
        lines.append(
            f"{p.peer_id[:28]:<28} {p.role:<8} {'yes' if p.alive else 'DEAD':<6} {'yes' if p.ready else 'no':<6} "
            f"{p.loaded_version:>7} {p.lag:>5} {p.seconds_since_seen:>9.1f}"
        )
    if not status.peers:
        lines.append("(no peers)")
    return "\n".join(lines)


def to_json(status: Status) -> str:
    """The Status as JSON (for scripts: every counter, every peer)."""
    return json.dumps(msgspec.to_builtins(status), indent=2, sort_keys=True)


def alive_actors(status: Status) -> int:
    return sum(1 for p in status.peers if p.role == "actor" and p.alive)


def wait_until_ready(client: BrokerConnection, seconds: float, where: str, min_actors: int = 0, show=render,
                     poll_s: float = 1.0) -> int:
    """Ask for the Status until the broker answers with at least `min_actors` live actors (0, the status
    printed) or `seconds` pass (1, the reason printed)."""
    deadline = time.monotonic() + seconds
    status, error = None, None
    while True:
        try:
            status = client.request(StatusRequest(), timeout=max(0.1, min(poll_s, deadline - time.monotonic())))
            if alive_actors(status) >= min_actors:
                print(show(status))
                return 0
        except BrokerError as exc:
            error = exc
        if time.monotonic() >= deadline:
            reason = (f"did not answer within {seconds:g} s: {error}" if status is None else
                      f"has {alive_actors(status)} live actors of the {min_actors} awaited after {seconds:g} s")
            print(f"broker at {where} {reason}", file=sys.stderr)
            return 1
        if status is not None:
            time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether status", description="Show the broker's peers, versions and buffer.")
    parser.add_argument("--config", default=None, help="YAML run config (for the broker address and keys)")
    parser.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until interrupted")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker's answer")
    parser.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="readiness check for launchers: ask again until the broker answers or SECONDS pass; "
                             "exit 0 once it answers, 1 when it never did")
    parser.add_argument("--min-actors", type=int, default=0, metavar="N",
                        help="with --wait: ready only once N actors are registered and alive")
    parser.add_argument("--json", action="store_true", help="print the Status as JSON instead of the table")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. broker.port=5556")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(parser, args.config, args.overrides, check_model_dir=False)
    show = to_json if args.json else render
    with BrokerConnection.from_config(cfg.broker, peer_id=f"status-{time.time_ns()}", role="tool") as client:
        if args.wait is not None:
            return wait_until_ready(client, args.wait, f"{cfg.broker.host}:{cfg.broker.port}", args.min_actors, show)
        while True:
            try:
                text = show(client.request(StatusRequest(), timeout=args.timeout))
            except BrokerError as exc:
                print(f"broker at {cfg.broker.host}:{cfg.broker.port}: {exc}", file=sys.stderr)
                return 1
            if args.watch is None:
                print(text)
                return 0
            print("\x1b[2J\x1b[H" + text, flush=True)
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0


if __name__ == "__main__":
    sys.exit(main())
