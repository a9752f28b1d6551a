"""The denoising error every offline and constrained method is built on."""

from __future__ import annotations

import torch


def denoising_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch elements (float32)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)
