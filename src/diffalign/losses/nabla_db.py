"""Residual ∇-DB, the loss of ∇-GFlowNet (Liu, Xiao, Liu, Bengio & Zhang, "Efficient Diversity-Preserving
Diffusion Alignment via Gradient-Informed GFlowNets", ICLR 2025, arXiv 2412.07775; METHODS.md §7).

A GFlowNet on the denoising chain satisfies detailed balance for every transition
x_t -> x_{t-1}: F(x_t) p_F(x_{t-1} | x_t) = F(x_{t-1}) p_B(x_t | x_{t-1}). Taking the
gradient of its log with respect to x_{t-1} and to x_t, and subtracting the same two
equations for the pretrained model (whose flow is F_ref; the backward policy p_B is the
same and cancels), gives with the residual flow log F − log F_ref ≈ β·γ_t·log R(x0_hat) + ρ:

    forward:  a_θ = a_ref + β γ_{t-1} ∇ log R(x0_hat(x_{t-1})) + g_φ(x_{t-1})
    reverse:  b_θ = b_ref − β γ_t     ∇ log R(x0_hat(x_t))     − g_φ(x_t)

where a = ∇_{x_{t-1}} log p(x_{t-1} | x_t) = −(x_{t-1} − μ(x_t)) / σ² and
b = ∇_{x_t} log p(x_{t-1} | x_t) (through μ(x_t), by autograd), and g_φ ≈ ∇ρ is the learned
residual flow score. At x_0 the flow is R^β exactly: the last transition's forward target
has no g term and ||g_φ(x_0)||² is a penalty. The fixed point is p_θ(x_0) ∝ p_ref(x_0)·R(x_0)^β.

Losses are per-element means of the squared residuals, per sample (as the reference code),
times an optional per-transition `weight`. Scores have the scale 1/σ (a = −z/σ for the
step's noise z), so unweighted residuals of the last, nearly noiseless steps outweigh
those of the early steps by 1/σ⁴; weight = σ² puts every transition on the scale of its
noise. Positive weights do not move the fixed point: every residual is zero there.
"""

from __future__ import annotations

import torch


def gaussian_scores(mean: torch.Tensor, std: torch.Tensor, x_prev: torch.Tensor, x_t: torch.Tensor,
                    create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the step Gaussian N(x_prev; mean(x_t), std²): a = −(x_prev − mean)/std² and
    b = ∇_{x_t} log N(...) by autograd (`x_t` must require grad and `mean` depend on it).
    `create_graph=True` keeps b differentiable, so a loss on b reaches the parameters of mean."""
    var = std ** 2
    a = -(x_prev.detach() - mean) / var
    log_density = (-((x_prev.detach() - mean) ** 2) / (2 * var)).sum()  # std does not depend on x_t
    (b,) = torch.autograd.grad(log_density, x_t, create_graph=create_graph)
    return a, b


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def _kind_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Mean of per-sample `v` over the rows `mask` selects; None when it selects none."""
    return v.detach()[mask].mean() if bool(mask.any()) else None


def residual_db_loss(a, a_ref, b, b_ref, reward_prev, reward_t, flow_prev, flow_t, terminal: torch.Tensor,
                     reverse_weight: float = 1.0, weight: torch.Tensor | None = None,
                     flow_weight: torch.Tensor | None = None):
    """Per-sample residual ∇-DB loss: forward + reverse_weight·reverse + the terminal penalty.

    `reward_prev`/`reward_t` are β γ ∇ log R(x0_hat(·)) at x_{t-1} and x_t (detached);
    `flow_prev`/`flow_t` are g_φ at x_{t-1} (at timestep 0 for the last transition) and x_t;
    `terminal` marks the last transition (x_{t-1} = x_0). `weight` and `flow_weight` (N,) scale
    each transition's squared residuals in the gradient of the policy (a, b) and of the flow
    (g_φ) respectively (None: 1); with both None this is the plain sum of squares. Given a
    weight, the value is w·(policy-side residuals) + wf·(flow-side residuals): the same residuals
    twice, each half reaching only its own side's parameters (with w = wf = 1, twice the plain
    value, with the plain gradient on each side). The terminal forward residual has no g_φ in
    its target, so it has no flow side: every term of the value has a gradient.

    The info holds the residuals by kind (`forward`, `reverse` over non-terminal transitions,
    `forward_terminal`, `reverse_terminal` over terminal ones, each present only when the
    minibatch has such rows), the penalty `terminal_flow`, and the two sides of the value
    (`policy_part`, `flow_part`, their per-sample means; without weights `policy_part` is the
    whole plain value and `flow_part` 0)."""
    end_mask = terminal.bool()
    end = end_mask.view(-1, *[1] * (a.ndim - 1)).to(a.dtype)
    fwd_target = a_ref + reward_prev + (1 - end) * flow_prev
    rev_target = b_ref - reward_t - flow_t
    penalty = _mean(flow_prev ** 2) * end_mask.to(a.dtype)

    def residuals(a, fwd_target, b, rev_target):
        return _mean((a - fwd_target) ** 2), _mean((b - rev_target) ** 2)

    if weight is None and flow_weight is None:
        forward, reverse = residuals(a, fwd_target, b, rev_target)
        policy = forward + reverse_weight * reverse
        flow_side = torch.zeros_like(policy)
    else:
        w = 1.0 if weight is None else weight
        wf = 1.0 if flow_weight is None else flow_weight
        forward, reverse = residuals(a, fwd_target.detach(), b, rev_target.detach())  # reaches θ only
        ff, fr = residuals(a.detach(), fwd_target, b.detach(), rev_target)  # the same values, reaches g_φ only
        policy = w * (forward + reverse_weight * reverse)
        flow_side = wf * ((~end_mask).to(ff.dtype) * ff + reverse_weight * fr)
    info = {"terminal_flow": penalty.sum().detach() / end_mask.sum().clamp(min=1),
            "policy_part": policy.detach().mean(), "flow_part": flow_side.detach().mean()}
    for name, v in (("forward", forward), ("reverse", reverse)):
        for suffix, mask in (("", ~end_mask), ("_terminal", end_mask)):
            m = _kind_mean(v, mask)
            if m is not None:
                info[name + suffix] = m
    return policy + flow_side + penalty, info
