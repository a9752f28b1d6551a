"""Per-model evaluation spaces: where diversity and the Fréchet distance are measured.

- `digits`: the held-out classifier's 128-d penultimate features (the stand-in for
  DreamSim/Inception, independent of the training reward's network); real data = all
  1,797 scikit-learn digits; classes = the held-out classifier's argmax.
- `toy2d`: the points themselves; real data = 20,000 exact draws of the mixture; no
  classes; plus the distance to the exact KL-regularised optimum (`optimum.py`).

Another model gets an entry here (a features function and real data); models without
one are evaluated on rewards, win rate and KL only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch


@dataclass
class Space:
    name: str
    features: Callable[[torch.Tensor], torch.Tensor]  # decoded samples -> (N, d)
    real: Callable[[], torch.Tensor]  # real data, decoded like samples
    classes: Callable[[torch.Tensor], torch.Tensor] | None = None  # decoded samples -> (N,) labels
    num_classes: int = 0
    description: str = ""


def _digits() -> Space:
    from ..data import digits as data
    from ..rewards import digits as rd

    def classes(images):
        with torch.no_grad():
            net = rd.load_classifier(heldout=True, device=images.device)
            return net(rd.prepare(images)).argmax(-1)

    return Space("digits", lambda x: rd.features(x, heldout=True), lambda: data.load("all")[0], classes, 10,
                 "held-out classifier penultimate features (128-d)")


def _toy2d() -> Space:
    from ..models import toy2d

    return Space("toy2d", lambda x: x.float(),
                 lambda: toy2d.sample_data(20000, torch.Generator().manual_seed(0)),
                 description="the 2-D points")


SPACES = {"digits": _digits, "toy2d": _toy2d}


@lru_cache(maxsize=None)
def get_space(model_name: str) -> Space | None:
    make = SPACES.get(model_name)
    return make() if make else None


@lru_cache(maxsize=None)
def real_features(model_name: str) -> torch.Tensor:
    space = get_space(model_name)
    return space.features(space.real()).cpu()
