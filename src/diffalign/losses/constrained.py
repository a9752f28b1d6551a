"""Primal-dual training of a constrained diffusion model (Khalafi, Ding & Ribeiro, NeurIPS 2024;
seed 003; METHODS.md §9).

Problem: minimise L_0(θ) subject to L_i(θ) ≤ b_i, each L the ε-MSE denoising loss on a
data set. Lagrangian L(θ, μ) = L_0(θ) + Σ_i μ_i L_i(θ) (the constant −Σ μ_i b_i has no
θ-gradient); the primal step descends it in θ, the dual step ascends it in μ ≥ 0:

    plain:      μ_i ← max(0, μ_i + η_d · (L̂_i − b_i))

with L̂_i a running estimate of L_i (the method averages the minibatch losses since the
last dual step), not one minibatch.

Resilient variant (the constraint relaxed by u_i ≥ 0 at a cost h(u) = α‖u‖²):
minimise L_0 + α‖u‖² subject to L_i ≤ b_i + u_i. Its Lagrangian
L_0 + α‖u‖² + Σ μ_i (L_i − b_i − u_i) is minimised over u at 2α·u_i = μ_i, so
u_i* = μ_i / (2α) and the dual gradient is L_i − b_i − μ_i / (2α):

    resilient:  μ_i ← max(0, μ_i + η_d · (L̂_i − b_i − μ_i / (2α)))

At a fixed point with an active constraint, μ_i = 2α · (L̂_i − b_i): the multiplier
stays finite however infeasible b_i is, and the relaxation u_i = L̂_i − b_i is what the
problem gives up. (Derived here; the paper's text is not available on this machine. The
public notebook updates μ_i + η_d(L_i − 2α·μ_i) with b = 0, i.e. h(u) = ‖u‖²/(4α):
its α = 0.085 is α = 1/(4·0.085) ≈ 2.94 in the convention used here.)
"""

from __future__ import annotations

import torch


def dual_step(mu: torch.Tensor, loss: torch.Tensor, bound: torch.Tensor, lr: float, alpha: float = 0.0) -> torch.Tensor:
    """One projected dual-ascent step on every multiplier; `alpha` > 0 is the resilient variant."""
    grad = loss - bound
    if alpha > 0:
        grad = grad - mu / (2 * alpha)
    return (mu + lr * grad).clamp(min=0.0)


def lagrangian(main: torch.Tensor, constraints: list[torch.Tensor], mu: torch.Tensor) -> torch.Tensor:
    """L_0 + Σ μ_i L_i: the primal objective (μ is a constant of the primal step)."""
    total = main
    for m, loss in zip(mu.detach().tolist(), constraints):
        total = total + m * loss
    return total
