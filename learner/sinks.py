"""Metrics sinks: where rank 0 writes each step's record, chosen by `run.report_to`.

    sinks = build_sinks(config)          # JSON lines, TensorBoard and/or W&B
    sinks.write(record)                  # one call per step, the same keys to every sink
    sinks.close()

Every sink receives the same record; `step` is the x axis (TensorBoard global_step, W&B step) and
every other numeric key is logged under its own name, so a key found in metrics.jsonl has the same
name in TensorBoard and W&B. `elapsed_s` (seconds since the sinks were built) is added here, since
wall-clock time as a float32 TensorBoard scalar would lose whole minutes of precision.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Protocol

from tether.common.config import RunConfig
from tether.common.errors import ConfigError
from tether.common.logging import get_logger
from tether.learner.metrics import MetricsWriter

log = get_logger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict) -> dict[str, float]:
    """The numeric entries of a record other than `step` (None stands for NaN in JSON lines)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if value is None:
            out[key] = math.nan
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


class JsonlSink:
    """metrics.jsonl, one JSON object per step (the format `tether demo` and launch/plot.py read)."""

    def __init__(self, run_dir: Path):
        self._writer = MetricsWriter(run_dir)
        self.path = self._writer.path

    def write(self, record: dict) -> None:
        self._writer.write(record)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Event files under <run_dir>/tensorboard/ (`tensorboard --logdir <run_dir>/tensorboard`)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        now = time.time()
        for key, value in _scalars(record).items():
            self._writer.add_scalar(key, value, global_step=int(record["step"]), walltime=now)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_mode(configured: str, environ: dict[str, str] | None = None) -> str:
    """offline or online: `configured` unless auto, then WANDB_MODE, then online only with a key."""
    env = os.environ if environ is None else environ
    if configured != "auto":
        return configured
    if env.get("WANDB_MODE") in ("offline", "online", "disabled"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


class WandbSink:
    """A Weights & Biases run named run.name in project run.wandb_project, files under <run_dir>/wandb/."""

    def __init__(self, config: RunConfig, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.report_to: wandb is listed but the wandb package is not installed "
                              "(pip install 'tether-rl[wandb]')") from None

        self.mode = wandb_mode(config.run.wandb_mode)
        # console capture and system stats off: the learner's own logs are the console record, and
        # a sampling thread per run would take CPU from training on a small machine.
        self._run = wandb.init(
            project=config.run.wandb_project, name=config.run.name, dir=str(run_dir), mode=self.mode,
            config=dataclasses.asdict(config), reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        self.run_dir = Path(self._run.dir).parent if self._run.dir else run_dir / WANDB_DIR
        log.info("wandb run started", mode=self.mode, project=config.run.wandb_project, dir=str(self.run_dir))

    def write(self, record: dict) -> None:
        self._run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self._run.finish()


class MetricsSinks:
    """Fans one record out to every configured sink; adds `elapsed_s`."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self._started = time.monotonic()

    def write(self, record: dict) -> dict:
        record = {**record, "elapsed_s": time.monotonic() - self._started}
        for sink in self.sinks:
            sink.write(record)
        return record

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_sinks(config: RunConfig) -> MetricsSinks:
    """The sinks named by `config.run.report_to`, writing under `config.run.dir`."""
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    factories = {
        "jsonl": lambda: JsonlSink(run_dir),
        "tensorboard": lambda: TensorBoardSink(run_dir),
        "wandb": lambda: WandbSink(config, run_dir),
    }
    return MetricsSinks([factories[name]() for name in config.run.report_to])
