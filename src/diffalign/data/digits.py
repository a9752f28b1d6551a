"""scikit-learn's 8x8 handwritten digits (1797 images), split once and for all.

Images are float tensors (N, 1, 8, 8) in [0, 1] (pixel value / 16); labels are
ints 0..9. The split is a fixed permutation (seed 0): the last 297 images are
the test split, never used for training any network here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

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


def parse_digit(prompt: str) -> int:
    """'3', 'a handwritten 3', 'digit 3' -> 3. Exactly one digit character is required."""
    found = [c for c in prompt if c.isdigit()]
    if len(found) != 1:
        raise ValueError(
            f"digits prompt {prompt!r} must name exactly one digit 0-9, e.g. '3' or 'a handwritten 3'"
        )
    return int(found[0])
