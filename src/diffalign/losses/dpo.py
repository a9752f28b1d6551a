"""The DPO loss, for step-level pairs (D3PO, SPO, TailorPO) and offline pairs (Diffusion-DPO).

    loss = -log σ(β · (clip(log r_w) - clip(log r_l))),   log r = log π_θ - log π_ref

with the log-ratio optionally clamped to [log(1 - ε), log(1 + ε)] (D3PO's clipped ratio;
the clamp has zero gradient outside the range, as in D3PO's code).

Diffusion-DPO (Wallace et al. 2024) writes the loss on denoising errors e:
-log σ(-β/2 · [(e_w - e_l) - (e_w^ref - e_l^ref)]), which is this loss with the
log-ratio -(e - e_ref) / 2 (`logratio_from_errors`): a lower error than the reference
stands for a higher likelihood.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logratio_from_errors(e: torch.Tensor, e_ref: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO's stand-in for log π_θ/π_ref: -(e_θ - e_ref) / 2."""
    return -(e - e_ref) / 2


def dpo_loss(logratio_w, logratio_l, beta: float, clip: float | None = None):
    """Per-pair loss and diagnostics; `clip` = ε in (0, 1), or None for no clipping."""
    winner, loser = logratio_w, logratio_l
    if clip is not None:
        if not 0 < clip < 1:
            raise ValueError(f"DPO log-ratio clip must be in (0, 1), got {clip}")
        lo, hi = math.log(1.0 - clip), math.log(1.0 + clip)
        winner, loser = winner.clamp(lo, hi), loser.clamp(lo, hi)
    z = beta * (winner - loser)
    info = {"accuracy": (z > 0).float().mean().detach(), "margin": z.mean().detach(),
            "logratio_w": logratio_w.mean().detach(), "logratio_l": logratio_l.mean().detach()}
    return -F.logsigmoid(z), info
