"""PPO's clipped surrogate (DDPO, METHODS.md §1)."""

from __future__ import annotations

import torch


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """max(-A·ratio, -A·clip(ratio, 1 - ε, 1 + ε)) per item, ratio = exp(log π_θ - log π_old).

    At ratio 1 the gradient is -A·∇log π: descending raises the log-prob of positive
    advantages. Outside the clip range (on the side the advantage pushes) it is zero."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    info = {
        "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2).detach(),
        "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()).detach(),
    }
    return torch.maximum(unclipped, clipped), info
