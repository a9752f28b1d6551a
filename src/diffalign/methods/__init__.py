"""Method registry. A method is one file in this package that defines a class
decorated with `@register`; importing the package finds them all, so adding a
method is one new file plus a config.

A method class provides (see `ddpo.py` for a complete example):
- `name`, `description` (one line), `Config` (dataclass of its `args:` options);
- `requires_logprob` (eta > 0 needed), `requires_reference` (the frozen base is
  used), `requires_differentiable_reward`;
- `defaults`: config values the method prefers, applied under the user's config;
- `__init__(self, trainer, args)`;
- `collect(self, epoch) -> (data, metrics)`: sampling and reward queries, no grad;
- `micro_steps(self, data) -> iterable of Micro`: each Micro computes one loss;
  the loop runs backward on it and steps the optimizer after a Micro with
  `step=True`;
- `state_dict()` / `load_state_dict(d)`: JSON-able state kept in checkpoints.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

METHODS: dict[str, type] = {}


@dataclass
class Micro:
    """One micro-batch loss: `compute()` -> (loss tensor, metrics dict of floats)."""

    compute: Callable
    step: bool = True  # step the optimizer after this micro-batch's backward


def register(cls: type) -> type:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> type:
    _discover()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}: registered methods are {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]


def list_methods() -> list[tuple[str, str]]:
    _discover()
    return [(n, METHODS[n].description) for n in sorted(METHODS)]
