"""Loss functions, one file each, found by module name; the learner is blind to which one runs.

An algorithm is a module in this package that defines `ALGORITHM = Algorithm(...)`: a function
from per-sequence rewards to advantages and a pure loss function `LossInput -> LossOutput`
(tether.learner.algorithms.core). Adding one is adding one file; `learner.algorithm=<module>`
selects it.
"""

from __future__ import annotations

import importlib
import pkgutil

from tether.learner.algorithms.core import Algorithm, LossInput, LossOutput, LossParams

__all__ = ["Algorithm", "LossInput", "LossOutput", "LossParams", "available_algorithms", "get_algorithm"]

_NOT_ALGORITHMS = frozenset({"core"})


def available_algorithms() -> list[str]:
    """Names of every module in this package that defines an ALGORITHM."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_ALGORITHMS or info.name.startswith("_"):
            continue
        if isinstance(getattr(importlib.import_module(f"{__name__}.{info.name}"), "ALGORITHM", None), Algorithm):
            names.append(info.name)
    return sorted(names)


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name` (its module name); ValueError naming the choices if none."""
    if name in available_algorithms():
        return importlib.import_module(f"{__name__}.{name}").ALGORITHM
    raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(available_algorithms())}")
