"""Base models by name: a registry that every model file joins with `@register_model`.

A model file in this package defines a loader `load(progress=True) -> DiffusionModel`
and decorates it; importing the package finds them all, so adding a model is one
new file (see `toy2d.py`). `load_model(name)` returns a `DiffusionModel`
(`models/base.py`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from ..registry import import_all
from .base import DiffusionModel, EvalSpace


@dataclass
class ModelEntry:
    name: str
    load: Callable[..., DiffusionModel]  # load(progress=True) -> DiffusionModel
    description: str


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str):
    """Decorator for a loader `load(progress=True) -> DiffusionModel`."""

    def deco(load: Callable) -> Callable:
        if name in MODELS and MODELS[name].load is not load:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(name, load, description)
        return load

    return deco


def _discover() -> None:
    import_all(__name__, __path__)


def model_names() -> list[str]:
    _discover()
    return sorted(MODELS)


def list_models() -> list[tuple[str, str]]:
    return [(n, MODELS[n].description) for n in model_names()]


def load_model(name: str, device: str | None = None, progress: bool = True) -> DiffusionModel:
    """Load a registered base model, pretraining and caching it on first use."""
    names = model_names()
    if name not in MODELS:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(names)}.{hint}")
    model = MODELS[name].load(progress=progress)
    if device is not None:
        model.to(device)
    return model


__all__ = ["DiffusionModel", "EvalSpace", "MODELS", "list_models", "load_model", "model_names", "register_model"]
