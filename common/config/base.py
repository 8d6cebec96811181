"""Shared helpers for the per-component config dataclasses."""

from __future__ import annotations

from typing import ClassVar

from tether.common.errors import ConfigError


class Section:
    """Mixin for a config dataclass: knows its dotted path so errors name the full key."""

    SECTION: ClassVar[str] = ""

    def require(self, condition: bool, key: str, message: str) -> None:
        """Fail with a ConfigError naming `SECTION.key` unless `condition` holds."""
        if not condition:
            full_key = f"{self.SECTION}.{key}" if self.SECTION else key
            raise ConfigError(f"{full_key}: {message} (got {getattr(self, key, None)!r})")

    def require_choice(self, key: str, choices: tuple[str, ...]) -> None:
        self.require(getattr(self, key) in choices, key, f"must be one of {', '.join(choices)}")
