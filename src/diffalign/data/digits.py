"""scikit-learn's 8x8 handwritten digits (1797 images), split once and for all.

Images are float tensors (N, 1, 8, 8) in [0, 1] (pixel value / 16); labels are
ints 0..9. The split is a fixed permutation (seed 0): the last 297 images are
the test split, never used for training any network here. `rotate` turns images
by given angles (the `digits-rotated` model's augmentation, the angle judge's data).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

N_TEST = 297


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(images))
    return images[perm], d.target[perm].astype(np.int64)


def load(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N,1,8,8) in [0,1], labels (N,)) for split 'train', 'test' or 'all'."""
    images, labels = _load()
    if split == "train":
        sl = slice(0, len(images) - N_TEST)
    elif split == "test":
        sl = slice(len(images) - N_TEST, None)
    elif split == "all":
        sl = slice(None)
    else:
        raise ValueError(f"unknown digits split {split!r}: use 'train', 'test' or 'all'")
    x = torch.from_numpy(images[sl]).unsqueeze(1)
    y = torch.from_numpy(labels[sl])
    return x, y


def rotate(images: torch.Tensor, degrees: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Images (N, 1, H, W) in [0, 1] turned counter-clockwise (as displayed) by `degrees` (N,) about their
    centre, and moved by `shift` (N, 2) pixels (x right, y down) if given: bilinear, zeros outside.
    90 degrees is exactly `torch.rot90(images, 1, (2, 3))` (pixel centres land on pixel centres)."""
    a = torch.deg2rad(degrees.to(images.dtype).reshape(-1))
    c, s, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1)], 1)  # output -> input
    if shift is not None:  # out(y) = in(R (y - shift)), in grid units (2 / size per pixel)
        step = shift.to(images.dtype) * 2 / torch.tensor(images.shape[-1:-3:-1], dtype=images.dtype)
        theta[:, :, 2] = -(theta[:, :, :2] @ step[:, :, None])[:, :, 0]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def parse_digit(prompt: str) -> int:
    """'3', 'a handwritten 3', 'digit 3' -> 3. Exactly one digit character is required."""
    found = [c for c in prompt if c.isdigit()]
    if len(found) != 1:
        raise ValueError(
            f"digits prompt {prompt!r} must name exactly one digit 0-9, e.g. '3' or 'a handwritten 3'"
        )
    return int(found[0])
