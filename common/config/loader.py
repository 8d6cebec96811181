"""Load a RunConfig from YAML plus `key=value` overrides, and save the resolved result."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from omegaconf.errors import ValidationError as OmegaValidationError

from tether.common.config.model_check import check_model
from tether.common.config.run import RunConfig
from tether.common.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_model_dir: bool = True) -> RunConfig:
    """Merge the schema defaults, the YAML file at `path` and the overrides, then validate.

    Raises ConfigError naming the key for an unknown key, a wrong type or a rule violation. With
    `check_model_dir` (tools that never load the model, such as `tether status`, pass False), a
    non-empty model.path must hold a config.json that agrees with the run config (model_check).
    """
    schema = OmegaConf.structured(RunConfig)
    where = f" in {path}" if path else ""
    try:
        merged = schema
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [item for item in overrides if "=" not in item or item.startswith("=")]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        where = f" (from {path} and overrides)" if path else " (from overrides)"
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise ConfigError(f"{exc.full_key}: unknown config key{where}") from None
    except OmegaValidationError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{exc.full_key}: {reason}{where}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', '') or 'config'}: {str(exc).splitlines()[0]}{where}") from None
    assert isinstance(config, RunConfig)
    if check_model_dir:
        check_model(config)
    return config


def load_config_or_exit(parser: argparse.ArgumentParser, path: str | Path | None, overrides, *,
                        check_model_dir: bool = True) -> RunConfig:
    """load_config for a command line: a bad config ends the program the way argparse ends a bad
    argument, with `<prog>: config error: <message naming the key>` and exit status 2."""
    try:
        return load_config(path, overrides, check_model_dir=check_model_dir)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: config error: {exc}\n")


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_resolved(config: RunConfig, run_dir: str | Path, component: str) -> Path:
    """Write the fully resolved config a daemon runs with to <run_dir>/config/<component>.yaml."""
    out = Path(run_dir) / "config" / f"{component}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(config))
    return out
