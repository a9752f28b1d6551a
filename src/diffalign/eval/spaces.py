"""Evaluation spaces: where diversity and the Fréchet distance are measured.

Each model may provide its own (`DiffusionModel.eval_space()`, an `EvalSpace`: a feature
function, real data, optional classes and extra metrics). A run's `eval.features` and
`eval.real` replace it (`configure`, called by `Run`):

- `eval.features: CLIP_FOLDER`: L2-normalised CLIP image embeddings of that folder
  (`diffalign.rewards.images.load_clip`); the model's own classes and extras are kept;
- real data: `eval.real` (a data spec, `diffalign.data.datasets`) if given, else the
  model's own space's real data, else none: then no Fréchet distance is reported;
- `eval.real` for a model without a space of its own: the pixel space
  (`pixel_space`): images resized to 32x32 (area), grey repeated to RGB, flattened.

Models without a space (and no `eval.features` / `eval.real`) are evaluated on rewards,
win rate and KL only. Spaces and the real data's features are cached by (model name,
features, real).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..models.base import EvalSpace

PIXEL_SIZE = 32
_SPACES: dict[tuple, EvalSpace | None] = {}
_REAL: dict[tuple, torch.Tensor | None] = {}


def space_key(model) -> tuple:
    return (model.name, *getattr(model.eval_space, "key", (None, None)))


def get_space(model) -> EvalSpace | None:
    key = space_key(model)
    if key not in _SPACES:
        _SPACES[key] = model.eval_space()
    return _SPACES[key]


def real_features(model) -> torch.Tensor | None:
    """Features of the space's real data (CPU), or None when it has none."""
    key = space_key(model)
    if key not in _REAL:
        space = get_space(model)
        _REAL[key] = None if space is None or space.real is None else space.features(space.real()).cpu()
    return _REAL[key]


def configure(model, eval_cfg) -> None:
    """Set `model.eval_space` from `eval_cfg.features` and `eval_cfg.real` (see the module docstring)."""
    features, real = getattr(eval_cfg, "features", None), getattr(eval_cfg, "real", None)
    own = getattr(model.eval_space, "own", model.eval_space)
    if features is None and real is None:
        model.eval_space = own
        return
    if features is not None:
        from ..rewards.images import clip_folder

        clip_folder("eval.features", features)  # a wrong folder fails now, not after training

    def space() -> EvalSpace | None:
        return build_space(own(), features, real)

    space.own, space.key = own, (features, real)
    model.eval_space = space


def build_space(base: EvalSpace | None, features: str | None = None, real: str | None = None) -> EvalSpace | None:
    """`base` (the model's own space, or None) with CLIP `features` and/or `real` data in place of its own."""
    if features is None and real is None:
        return base
    real_fn = (lambda: load_real(real)) if real is not None else (base.real if base is not None else None)
    if features is not None:
        classes, num, extra = (base.classes, base.num_classes, base.extra) if base is not None else (None, 0, None)
        return EvalSpace(f"clip:{features}", clip_features(features), real_fn, classes, num,
                         f"L2-normalised CLIP image embeddings of {features}", extra)
    if base is not None:
        return dataclasses.replace(base, real=real_fn, description=f"{base.description}; real data: {real}")
    return pixel_space(real_fn)


def load_real(spec: str) -> torch.Tensor:
    from ..data.datasets import DatasetError, load

    try:
        return load(spec).images
    except DatasetError as e:
        raise DatasetError(f"config key 'eval.real': {e}") from None


def clip_features(folder: str, batch_size: int = 256):
    """images (N, 1 or 3, H, W) in [0, 1] -> L2-normalised CLIP image embeddings (N, d), no grad."""

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        from ..rewards.images import load_clip

        clip = load_clip(folder, images.device, who="eval.features")
        return torch.cat([clip.image_embeds(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    return features


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """images (N, 1 or 3, H, W) -> (N, 3 * 32 * 32): resized to 32x32 (area), grey repeated to RGB, flattened."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"the pixel evaluation space needs images (N, 1 or 3, H, W), got {shape}; set eval.features "
                         "to a CLIP folder, or leave eval.real unset for a model that does not decode to images")
    x = images.float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return F.interpolate(x, size=(PIXEL_SIZE, PIXEL_SIZE), mode="area").flatten(1)


def pixel_space(real_fn=None) -> EvalSpace:
    """The fallback for image models without a space of their own: raw pixels at 32x32."""
    return EvalSpace(f"pixels-{PIXEL_SIZE}x{PIXEL_SIZE}", pixel_features, real_fn,
                     description=f"pixels: images resized to {PIXEL_SIZE}x{PIXEL_SIZE} (area), grey repeated to RGB, "
                     f"flattened ({3 * PIXEL_SIZE * PIXEL_SIZE}-d)")
