"""`python -m tether.broker --config FILE key=value ...`: run the broker daemon."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from tether.broker.server import BrokerServer, build_state, build_transport
from tether.broker.state import RunPolicy
from tether.common.config import load_config_or_exit, save_resolved
from tether.common.logging import configure_logging, get_logger
from tether.common.process import exit_now
from tether.common.transport import load_server_keys


def model_vocab_size(model_path: str) -> int | None:
    """The vocabulary size in the model's config.json, for checking token ids (None if unknown)."""
    path = Path(model_path) / "config.json" if model_path else None
    if path is None or not path.is_file():
        return None
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    size = config.get("vocab_size")
    return int(size) if isinstance(size, int) else None


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
    vocab_size = model_vocab_size(cfg.model.path)
    if vocab_size is None:
        log.warning("model vocabulary unknown (model.path has no config.json): token ids are not range-checked")
    key_roles = load_server_keys(cfg.broker.keys_dir).key_roles if cfg.broker.curve_enabled else None
    state = build_state(cfg.broker, RunPolicy.from_run_config(cfg, vocab_size), key_roles=key_roles)
    server = BrokerServer(cfg.broker, state, build_transport(cfg.broker))
    if cfg.broker.host_store:
        server.start_store()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    log.info("broker listening", endpoint=f"tcp://{cfg.broker.listen_host}:{cfg.broker.port}",
             advertised=cfg.broker.host, incarnation=state.incarnation, curve=cfg.broker.curve_enabled,
             journal=cfg.broker.journal_path or None, buffered=state.ledger.depth, leased=state.ledger.leased,
             latest_version=state.book.latest_version, weights_mode=cfg.weights.mode)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    # The journal is closed (fsynced) and the sockets with it: skip the interpreter's teardown (3 s
    # here, of a process that imported torch for the store), time a launcher waits for.
    exit_now(main())
