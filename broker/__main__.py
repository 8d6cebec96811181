"""`python -m tether.broker --config FILE key=value ...`: run the broker daemon."""

from __future__ import annotations

import argparse
import signal
import sys

from tether.broker.server import BrokerServer, build_state, build_transport
from tether.common.config import load_config_or_exit, save_resolved
from tether.common.logging import configure_logging, get_logger


def main(argv: list[str] | None = None) -> int:
    """Load the config, replay the journal, bind, host the store and serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tether.broker", description="The tether broker daemon.")
    parser.add_argument("--config", default=None, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. broker.port=5556")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(parser, args.config, args.overrides)
    configure_logging(component="broker", run_dir=cfg.run.dir, level=cfg.run.log_level)
    save_resolved(cfg, cfg.run.dir, "broker")
    log = get_logger("tether.broker")
    state = build_state(cfg.broker, mode=cfg.weights.mode, rollouts_per_step=cfg.learner.rollouts_per_step)
    server = BrokerServer(cfg.broker, state, build_transport(cfg.broker))
    if cfg.broker.host_store:
        server.start_store()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    log.info("broker listening", endpoint=f"tcp://{cfg.broker.host}:{cfg.broker.port}",
             curve=cfg.broker.curve_enabled, journal=cfg.broker.journal_path or None,
             buffered=state.buffer.depth, weights_mode=cfg.weights.mode)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
