"""`python -m tether.actor --config FILE key=value ...`: run one actor daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from pathlib import Path

from tether.common.process import exit_now


def main(argv: list[str] | None = None) -> int:
    """Load the config, build or locate the model, connect to the broker and run the actor."""
    parser = argparse.ArgumentParser(prog="python -m tether.actor", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML run config")
    parser.add_argument("--max-groups", type=int, default=None, help="stop after this many groups (default: run forever)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)

    from tether.actor.broker_link import ActorLink
    from tether.actor.daemon import ActorDaemon
    from tether.actor.tasks import build_task
    from tether.common.config.loader import load_config_or_exit, save_resolved
    from tether.common.logging import configure_logging, get_logger
    from tether.common.peer import BrokerConnection

    config = load_config_or_exit(parser, args.config, args.overrides)
    actor_id = config.actor.actor_id or f"actor-{socket.gethostname()}-{os.getpid()}"
    # Several actors share a run directory: each gets its own log, resolved config and engine report.
    configure_logging(actor_id, config.run.dir, config.run.log_level)
    save_resolved(config, config.run.dir, actor_id)
    log = get_logger("tether.actor")
    model_path = config.model.path
    if not model_path:
        from tether.common.tiny_model import build_tiny_model

        model_path = str(Path(config.run.dir) / "tiny-model")
        if not (Path(model_path) / "config.json").is_file():
            build_tiny_model(model_path, seed=config.run.seed)
    connection = BrokerConnection.from_config(config.broker, peer_id=actor_id, role="actor")
    link = ActorLink(connection, worker_count=config.actor.engine.tensor_parallel_size,
                     max_unacked=config.actor.max_unacked_rollouts, resend_interval_s=config.actor.resend_interval_s)
    connection.start()
    daemon = ActorDaemon(config, model_path, link, build_task(config.task))
    # SIGTERM (the supervisor's stop) takes the same path as Ctrl-C: generation is cancelled, what
    # was sent gets a few seconds to be acked, and the final books are logged.
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        asyncio.run(daemon.run(args.max_groups))
    except KeyboardInterrupt:
        log.info("stopping on signal")
    except Exception as exc:
        log.error("actor failed", error=f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        flushed = link.flush(timeout=5.0)
        pump = daemon.pump
        log.info("actor stopped", actor_id=actor_id, rollouts_acked=link.acked_total,
                 rollouts_unacked=link.unacked_count, rollouts_invalid=link.invalid_total,
                 rollouts_discarded=link.discarded_total, flushed=flushed,
                 groups_discarded=pump.groups_discarded if pump is not None else 0,
                 grant_waits=pump.waits if pump is not None else 0, failed_updates=daemon.failed_updates,
                 version=daemon.engine.version if daemon.engine is not None else None)
        daemon.shutdown()
        connection.close()
    return code


def _interrupt(signum, frame):
    # One graceful stop: a launcher may deliver SIGTERM twice (Slurm signals every process of a step, a
    # supervisor its process group); a second one must not cut the flush of unacked rollouts short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # The engine is shut down and the broker connection closed: skip the interpreter's teardown, which
    # took 6 s quiet and 16 s under load, time a launcher waits before its next step.
    exit_now(main())
