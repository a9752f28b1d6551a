"""Evaluation spaces: where diversity and the Fréchet distance are measured.

Each model provides its own (`DiffusionModel.eval_space()`, an `EvalSpace`: a feature
function, real data, optional classes and extra metrics); this module only caches them,
and the real data's features, by model name. Models without one are evaluated on
rewards, win rate and KL only.
"""

from __future__ import annotations

import torch

from ..models.base import EvalSpace

_SPACES: dict[str, EvalSpace | None] = {}
_REAL: dict[str, torch.Tensor] = {}


def get_space(model) -> EvalSpace | None:
    if model.name not in _SPACES:
        _SPACES[model.name] = model.eval_space()
    return _SPACES[model.name]


def real_features(model) -> torch.Tensor:
    if model.name not in _REAL:
        space = get_space(model)
        _REAL[model.name] = space.features(space.real()).cpu()
    return _REAL[model.name]
