"""`tether status`: the broker's view of the run as a table (one-shot, or --watch)."""

from __future__ import annotations

import argparse
import sys
import time

from tether.common.config import load_config_or_exit
from tether.common.messages import Status
from tether.common.peer import BrokerClient, BrokerError


def render(status: Status) -> str:
    """The Status as a plain-text table."""
    lines = [
        f"latest version {status.latest_version}   epoch {status.epoch}   buffer {status.buffer_depth}   "
        f"rollouts/s {status.rollouts_per_second:.1f}   stored {status.stored_total}   "
        f"dropped stale {status.dropped_stale_total}",
        "",
        f"{'peer':<28} {'role':<8} {'alive':<6} {'version':>7} {'lag':>5} {'seen (s)':>9}",
    ]
    for p in status.peers:
        lines.append(
            f"{p.peer_id[:28]:<28} {p.role:<8} {'yes' if p.alive else 'DEAD':<6} {p.loaded_version:>7} "
            f"{p.lag:>5} {p.seconds_since_seen:>9.1f}"
        )
    if not status.peers:
        lines.append("(no peers)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether status", description="Show the broker's peers, versions and buffer.")
    parser.add_argument("--config", default=None, help="YAML run config (for the broker address and keys)")
    parser.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until interrupted")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. broker.port=5556")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(parser, args.config, args.overrides, check_model_dir=False)
    with BrokerClient.from_config(cfg.broker, peer_id=f"status-{time.time_ns()}", role="tool") as client:
        while True:
            try:
                text = render(client.status(timeout=args.timeout))
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
