"""Base models by name: the embedded defaults `digits` and `toy2d` (pretrained on
first use and cached), later local diffusers folders.

`load_model(name)` returns a `DiffusionModel` (see `models/base.py`).
"""

from __future__ import annotations

from .base import DiffusionModel

MODELS = {
    "digits": "class-conditional UNet2DModel on scikit-learn's 8x8 handwritten digits (pretrained on first use)",
    "toy2d": "MLP noise model on a 2-D Gaussian mixture with a known aligned optimum (pretrained on first use)",
}


def load_model(name: str, device: str | None = None, progress: bool = True) -> DiffusionModel:
    """Load a base model by name, pretraining and caching it on first use."""
    if name == "digits":
        from . import digits

        model = digits.load(progress=progress)
    elif name == "toy2d":
        from . import toy2d

        model = toy2d.load(progress=progress)
    else:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}: choose one of {known}")
    if device is not None:
        model.to(device)
    return model


__all__ = ["DiffusionModel", "MODELS", "load_model"]
