"""`python -m tether.actor --config FILE key=value ...`: run one actor daemon."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Load the config, build or locate the model, connect to the broker and run the actor."""
    parser = argparse.ArgumentParser(prog="python -m tether.actor", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML run config")
    parser.add_argument("--max-groups", type=int, default=None, help="stop after this many groups (default: run forever)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)

    from tether.actor.daemon import ActorDaemon, default_actor_id
    from tether.actor.tasks import build_task
    from tether.common.config.loader import load_config_or_exit, save_resolved
    from tether.common.logging import configure_logging, get_logger
    from tether.common.peer import BrokerClient

    config = load_config_or_exit(parser, args.config, args.overrides)
    actor_id = config.actor.actor_id or default_actor_id()
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
    client = BrokerClient.from_config(config.broker, peer_id=actor_id, role="actor",
                                      worker_count=config.actor.engine.tensor_parallel_size,
                                      max_unacked=config.actor.max_unacked_rollouts,
                                      resend_interval_s=config.actor.resend_interval_s).start()
    daemon = ActorDaemon(config, model_path, client, build_task(config.task))
    # SIGTERM (the supervisor's stop) takes the same path as Ctrl-C: generation is cancelled, what
    # was sent gets a few seconds to be acked, and the final books are logged.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        asyncio.run(daemon.run(args.max_groups))
    except KeyboardInterrupt:
        log.info("stopping on signal")
    finally:
        flushed = client.flush(timeout=5.0)
        log.info("actor stopped", actor_id=actor_id, rollouts_acked=client.acked_total,
                 rollouts_unacked=client.unacked_count, flushed=flushed,
                 version=daemon.engine.version if daemon.engine is not None else None)
        daemon.shutdown()
        client.close()
    return 0


def _interrupt(signum, frame):
    # One graceful stop: a launcher may deliver SIGTERM twice (Slurm signals every process of a step, a
    # supervisor its process group); a second one must not cut the flush of unacked rollouts short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
