"""Adjoint Matching (Domingo-Enrich et al., "Adjoint Matching: Fine-tuning Flow and Diffusion Generative
Models with Memoryless Stochastic Optimal Control", arXiv 2409.08861; METHODS-after-grpo.md §3),
written on the discrete chain the sampler runs.

A stochastic step is x_{k+1} = m_k(x_k) + s_k·ξ with the Gaussian step's mean m_k and std s_k
(`Sampler.step`). With the control cost Σ_k ‖m_θ,k − m_base,k‖² / (2 s_k²) (the path KL to the base)
and the terminal cost −λ·r(x_K), the lean adjoint runs backwards through the *base* step means:

    ã_K = −λ·∇r(x_K),      ã_k = (∂m_base,k / ∂x_k)ᵀ ã_{k+1}     (one vector–Jacobian product per step)

(the gradient of the terminal cost along a base trajectory with its noise held fixed), and the
regression is, per trained step,

    ρ_k = (m_θ,k(x_k) − m_base,k(x_k)) / s_k + s_k·ã_{k+1},      loss = ‖ρ_k‖²

whose minimiser shifts the base step's mean by −s_k²·E[ã_{k+1} | x_k], the optimal control. In the
flow SDE's variables (m = x − h·(2v + x/(1 − σ)), s = sqrt(2σh/(1 − σ))) ρ_k·/sqrt(h) is the paper's
(2/σ_t)(v_θ − v_base) + σ_t·ã up to its time direction. Under the memoryless schedule (x_0 independent
of x_K) the optimum is p_base·exp(λr) exactly.
"""

from __future__ import annotations

from typing import Callable

import torch


def lean_adjoint(step_mean: Callable, latents: torch.Tensor, terminal: torch.Tensor) -> torch.Tensor:
    """ã_0 … ã_K, (B, K + 1, *shape), from ã_K = `terminal` backwards: ã_k = (∂ step_mean(k, x)/∂x)ᵀ ã_{k+1}
    at x = latents[:, k]. `step_mean(k, x)` is the base step's mean, differentiable in x."""
    K = latents.shape[1] - 1
    adj = [None] * (K + 1)
    adj[K] = terminal.detach()
    for k in range(K - 1, -1, -1):
        with torch.enable_grad():
            x = latents[:, k].detach().requires_grad_(True)
            mean = step_mean(k, x)
            adj[k] = torch.autograd.grad(mean, x, adj[k + 1].to(mean.dtype))[0].detach()
    return torch.stack(adj, dim=1)


def adjoint_matching_loss(mean: torch.Tensor, mean_base: torch.Tensor, std: torch.Tensor, adjoint_next: torch.Tensor,
                          clip: float = 0.0):
    """(per-sample ‖ρ‖², info) with ρ = (mean − mean_base)/std + std·ã_{k+1}, summed over elements; `clip` > 0
    caps each sample's value (the paper's loss clipping; the capped samples pass no gradient)."""
    std = std.float()
    rho = (mean.float() - mean_base.float().detach()) / std + std * adjoint_next.float()
    per = rho.pow(2).flatten(1).sum(1)
    info = {"residual": per.mean().detach()}
    if clip > 0:
        info["clipped_fraction"] = (per > clip).float().mean()
        per = per.clamp(max=clip)
    return per, info
