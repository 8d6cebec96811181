"""Render the config reference (every key, type, default, docstring) as Markdown.

The docstring under each dataclass field is its documentation; this module reads them with `ast`
so the reference in docs/config.md is generated from the code, never written twice.
Regenerate with: python -m tether.common.config.reference > docs/config.md
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

from tether.common.config.run import RunConfig
from tether.common.docstrings import field_docs


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        return "" if dataclasses.is_dataclass(value) else repr(value)
    return ""


def _sections(cls: type, prefix: str):
    rows = []
    nested = []
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        default_value = field.default_factory() if field.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(default_value):
            nested.append((type(default_value), key))
            continue
        type_name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        rows.append((key, type_name, _default(field), docs.get(field.name, "")))
    yield prefix, cls, rows
    for nested_cls, key in nested:
        yield from _sections(nested_cls, key)


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in common/config/ by `python -m tether.common.config.reference`.",
        "Set keys in a YAML file (`--config FILE`) or as `key=value` overrides on any daemon's command line.",
        "",
    ]
    for prefix, cls, rows in _sections(RunConfig, ""):
        if not rows:
            continue
        lines += [f"## `{prefix}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [" ".join(inspect.cleandoc(cls.__doc__).split()), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += [f"| `{key}` | {type_} | `{default}` | {doc} |" for key, type_, default, doc in rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
