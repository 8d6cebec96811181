"""structlog set up once per process: readable console lines plus JSON lines in the run directory.

Usage at a daemon's entry point:

    configure_logging(component="actor", run_dir=cfg.run.dir, level=cfg.run.log_level)
    log = get_logger(__name__)
    log.info("engine started", tokens_per_s=1234.5)

Library code only calls `get_logger`; it never configures logging itself.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

_SHARED_PROCESSORS = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(
    component: str, run_dir: str | Path | None = None, level: str = "info", console: bool = True
) -> Path | None:
    """Route structlog and stdlib logging to the console and to <run_dir>/logs/<component>.jsonl.

    Calling it again replaces the previous handlers (tests and CLI subcommands may reconfigure).
    Returns the JSON lines path, or None without a run directory.
    """
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tether", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level.upper())

    if console:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=_SHARED_PROCESSORS,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
                ],
            )
        )
        console_handler._tether = True  # type: ignore[attr-defined]
        root.addHandler(console_handler)

    json_path = None
    if run_dir is not None:
        json_path = Path(run_dir) / "logs" / f"{component}.jsonl"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(json_path, encoding="utf-8")
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=_SHARED_PROCESSORS,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.dict_tracebacks,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        file_handler._tether = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
    return json_path


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
