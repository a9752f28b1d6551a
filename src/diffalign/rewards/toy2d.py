"""Reward for the 2-D toy: samples are points (N, 2).

`quadratic`: r(x) = -SCALE * ||x - TARGET||^2, maximal (0) at TARGET. With a
reference density p_ref, the KL-regularised optimum is
p*(x) ∝ p_ref(x) * exp(r(x) / beta); for a Gaussian component N(mu, s^2 I) of
p_ref this is again Gaussian, with precision 1/s^2 + 2*SCALE/beta, so later
code computes it in closed form from these constants.
"""

from __future__ import annotations

import torch

from . import register

__all__ = ["TARGET", "SCALE", "quadratic"]

TARGET: tuple[float, float] = (2.0, 2.0)
SCALE: float = 0.5


def quadratic(points: torch.Tensor, target=TARGET, scale: float = SCALE) -> torch.Tensor:
    """-scale * ||points - target||^2 for points (N, 2); differentiable."""
    t = torch.as_tensor(target, dtype=points.dtype, device=points.device)
    return -scale * ((points - t) ** 2).sum(dim=-1)


@register(
    "quadratic",
    description=f"2-D toy: -scale * ||x - target||^2 (defaults target={TARGET}, scale={SCALE}; "
    "max 0 at the target)",
    differentiable=True,
)
def _quadratic(device="cpu", target=TARGET, scale: float = SCALE):
    target = tuple(float(v) for v in target)
    scale = float(scale)
    if len(target) != 2:
        raise ValueError(f"quadratic reward: target must have 2 coordinates, got {target}")

    def fn(images, prompts, metadata=None):
        if not torch.is_tensor(images) or images.ndim != 2 or images.shape[1] != 2:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"quadratic reward needs points of shape (N, 2), got {shape}")
        x = images if images.is_floating_point() else images.float()
        return quadratic(x, target, scale), {}

    fn.differentiable = True
    fn.target = target
    fn.scale = scale
    return fn
