"""Primal-dual training of a constrained diffusion model (Khalafi, Ding & Ribeiro, NeurIPS 2024;
METHODS.md §9).

Problem: minimise L_0(θ) subject to L_i(θ) ≤ b_i, each L the ε-MSE denoising loss on a
data set. Lagrangian L(θ, μ) = L_0(θ) + Σ_i μ_i L_i(θ) (the constant −Σ μ_i b_i has no
θ-gradient); the primal step descends it in θ, the dual step ascends it in μ ≥ 0:

    plain:      μ_i ← max(0, μ_i + η_d · (L̂_i − b_i))

with L̂_i a running estimate of L_i (the method averages the minibatch losses since the
last dual step), not one minibatch.

Resilient variant (the constraint relaxed by u_i ≥ 0 at a cost h(u)), in the convention of the
authors' public code, whose α = 0.085 is the value the paper uses: the dual step is

    resilient:  μ_i ← max(0, μ_i + η_d · (L̂_i − b_i − 2α·μ_i))

This is the dual ascent of minimise L_0 + ‖u‖²/(4α) subject to L_i ≤ b_i + u_i: its Lagrangian
L_0 + ‖u‖²/(4α) + Σ μ_i (L_i − b_i − u_i) is minimised over u at u_i* = 2α·μ_i, so the dual
gradient is L_i − b_i − 2α·μ_i. At a fixed point with an active constraint μ_i = (L̂_i − b_i)/(2α):
the multiplier stays finite however infeasible b_i is, and the relaxation u_i = L̂_i − b_i is what
the problem gives up. A larger α relaxes more (cheaper relaxation, smaller multipliers). (Before
this convention the method used h(u) = α‖u‖², dual gradient L − b − μ/(2α): an old α_old is
α = 1/(4·α_old) here; the two agree at α = 0.5.)
"""

from __future__ import annotations

import torch


def dual_step(mu: torch.Tensor, loss: torch.Tensor, bound: torch.Tensor, lr: float, alpha: float = 0.0) -> torch.Tensor:
    """One projected dual-ascent step on every multiplier; `alpha` > 0 is the resilient variant
    (dual gradient L − b − 2α·μ, the public code's convention: its α = 0.085 means the same here)."""
    grad = loss - bound
    if alpha > 0:
        grad = grad - 2 * alpha * mu
    return (mu + lr * grad).clamp(min=0.0)


def lagrangian(main: torch.Tensor, constraints: list[torch.Tensor], mu: torch.Tensor) -> torch.Tensor:
    """L_0 + Σ μ_i L_i: the primal objective (μ is a constant of the primal step)."""
    total = main
    for m, loss in zip(mu.detach().tolist(), constraints):
        total = total + m * loss
    return total
