"""Forward-process RL losses: the pretraining denoising loss on re-noised clean samples, weighted
by advantages (DiffusionNFT: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with
Forward Process", arXiv 2509.16117; AWM: Xue et al., "Advantage Weighted Matching: Aligning RL
with Pretraining in Diffusion Models", arXiv 2509.25050). METHODS-after-grpo.md §1–2.

Every function takes per-sample tensors in one space: the model's own prediction space
(velocity v for flow models with target u = ε − x0; ε for DDIM models with target ε) or x0 space
(x̂0 from the prediction, target x0). x̂0 is affine in the prediction, so the implicit policies
below are the same combination in either space.

- `implicit_policies(pred, pred_old, β)`: NFT's v⁺ = β·v + (1−β)·v_old, v⁻ = (1+β)·v_old − β·v.
- `optimality_probability(A, A_max)`: r = ½ + clip(A, ±A_max) / (2·A_max).
- `nft_loss`: A_max·(r·ℓ⁺ + (1−r)·ℓ⁻)/β with ℓ± the mean squared error of v± (divided by its own
  detached mean absolute error with `adaptive`, the public code's x0-space form).
- `awm_surrogate`: AWM's per-sample log-likelihood surrogate ℓ = −w(t, mse); with ratio
  exp(ℓ − sg ℓ) = 1 its PPO-clip loss has the gradient −A·∇ℓ.
- `proximal`: ‖a − b‖² per sample (the KL-to-base and anchor penalties).

Identity (METHODS-after-grpo.md §1.3): with v_old = v (numerically; detached) and the plain
velocity form, ∇ nft_loss = 2·clip(A)·(v − u)/D = A_max × ∇ of AWM's uniform-weight loss with
advantages clip(A)/A_max. tests/test_forward.py checks it.
"""

from __future__ import annotations

import torch

from .denoising import denoising_error

WEIGHTINGS = ("ghuber", "uniform", "t")


def implicit_policies(pred: torch.Tensor, pred_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NFT's positive and negative policies built from the trained prediction and the old one."""
    return beta * pred + (1 - beta) * pred_old, (1 + beta) * pred_old - beta * pred


def optimality_probability(adv: torch.Tensor, adv_max: float) -> torch.Tensor:
    """r = ½ + clip(A, −A_max, A_max) / (2·A_max) ∈ [0, 1]."""
    return 0.5 + adv.clamp(-adv_max, adv_max) / (2 * adv_max)


def nft_loss(pos: torch.Tensor, neg: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float,
             adv_max: float, adaptive: bool = True) -> tuple[torch.Tensor, dict]:
    """(per-sample loss, metrics): A_max·(r·ℓ⁺ + (1−r)·ℓ⁻)/β. `adaptive`: each ℓ divided by the
    sample's own detached mean |error| (at least 1e-5), in float64 as the public code does."""
    losses = []
    for pred in (pos, neg):
        err = pred.double() - target.double()
        sq = err.pow(2).flatten(1).mean(1)
        if adaptive:
            sq = sq / err.abs().flatten(1).mean(1).clamp(min=1e-5).detach()
        losses.append(sq)
    per = adv_max * (r.double() * losses[0] + (1 - r.double()) * losses[1]) / beta
    return per.float(), {"loss_pos": losses[0].mean().detach(), "loss_neg": losses[1].mean().detach()}


def awm_surrogate(mse: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber", p: float = 0.25) -> torch.Tensor:
    """AWM's log-likelihood surrogate per sample, ℓ = −w(t, mse) (float64):
    `ghuber` −(t/p)·((mse + 1e-10)^p − 1e-10^p) (gradient −t·(mse+1e-10)^(p−1)·∇mse), `uniform` −mse,
    `t` −t·mse. `t` is the noise level in [0, 1] (1 = pure noise)."""
    mse, t = mse.double(), t.double()
    if weighting == "ghuber":
        return -(t / p) * ((mse + 1e-10) ** p - 1e-10 ** p)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -t * mse
    raise ValueError(f"unknown AWM weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")


def proximal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² per sample (mean over elements), `b` detached."""
    return denoising_error(a, b.detach())


def decay(step: int, rate: float, maximum: float, start: int = 0) -> float:
    """The anchor's decay η after `step` optimizer steps: 0 before `start`, then min(rate·(step − start), max).
    NFT's schedules: (0.001, 0.5) ("type 1"), (0.0075, 0.999, start 75) ("type 2"); AWM's EMA: (0.001, 0.3)."""
    return 0.0 if step < start else min(rate * (step - start), maximum)
