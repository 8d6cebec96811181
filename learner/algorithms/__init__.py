"""Loss functions, one file each, found by module name; the learner is blind to which one runs.

An algorithm is a module in this package that defines `ALGORITHM = Algorithm(...)`: a function
from per-sequence rewards to advantages and a pure loss function `LossInput -> LossOutput`
(tether.learner.algorithms.core). Adding one is adding one file; `learner.algorithm=<module>`
selects it. Every public module except `core` is an algorithm.

Importing this package does not import torch: the config checks `learner.algorithm` against
`available_algorithms()` in every daemon, the broker included, which has no use for torch. The
loss types are loaded from core on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.learner.algorithms.core import Algorithm, LossInput, LossOutput, LossParams

__all__ = ["ADVANTAGE_STDS", "AGGREGATIONS", "Algorithm", "LossInput", "LossOutput", "LossParams",
           "available_algorithms", "get_algorithm"]

AGGREGATIONS = ("token", "sequence")
"""How a loss averages: over all tokens of the step, or over sequences of per-sequence token means."""
ADVANTAGE_STDS = ("sample", "population")
"""Group std estimators of group-normalised advantages: divide by n - 1, or by n."""

_NOT_ALGORITHMS = frozenset({"core"})
_FROM_CORE = frozenset({"Algorithm", "LossInput", "LossOutput", "LossParams"})


def available_algorithms() -> list[str]:
    """Names of the algorithm modules in this package, sorted (read from the folder, not imported)."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__)
                  if info.name not in _NOT_ALGORITHMS and not info.name.startswith("_"))


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name` (its module name); ValueError naming the choices if none."""
    if name not in available_algorithms():
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(available_algorithms())}")
    algorithm = getattr(importlib.import_module(f"{__name__}.{name}"), "ALGORITHM", None)
    if algorithm is None or algorithm.name != name:
        raise TypeError(f"{__name__}.{name} must define ALGORITHM = Algorithm(name={name!r}, ...)")
    return algorithm


def __getattr__(name: str):
    if name in _FROM_CORE:
        from tether.learner.algorithms import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
