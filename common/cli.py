"""The `tether` command: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes `main(argv) -> int`;
this table only names them, and modules are imported lazily so `tether --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": ("tether.common.tiny_model", "build the embedded tiny Qwen2 model and warm-start it"),
    "eval": ("tether.actor.evaluate", "greedy accuracy of a model on a task with real vLLM V1"),
    "demo": ("tether.launch.demo", "the embedded end-to-end job on the tiny model (README command 1)"),
    "status": ("tether.broker.status", "the broker's live table: peers, versions, lag, buffer, rollouts/s"),
    "keys": ("tether.broker.keys", "make ZeroMQ CURVE keys for the broker and its clients"),
    "parity": ("tether.launch.parity", "parity doctor: actor vs learner logprobs with each correction on/off"),
    "chaos": ("tether.launch.chaos", "kill daemons during a real run and prove nothing acked was lost or trained twice"),
    "rollouts": ("tether.launch.rollouts_view", "readable view of a run's rollout archive (run.keep_rollouts)"),
    "audit": ("tether.launch.audit", "recompute archived rollouts' logprobs with the checkpoints that produced them"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tether", description="Asynchronous RL for language models.")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(
        f"{name}: {summary}" for name, (_, summary) in sorted(SUBCOMMANDS.items())))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the subcommand (see tether COMMAND --help)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    parsed = parser.parse_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[parsed.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
