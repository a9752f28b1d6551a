"""GRPO's pieces (Flow-GRPO, DanceGRPO, MixGRPO; METHODS.md §10): advantages normalised within
groups of samples of one prompt, and the closed-form KL of one Gaussian step to the reference.
The PPO clip on per-step ratios is `losses.ppo_clip_loss`."""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # Flow-GRPO's: (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: bool = False, weights=None):
    """(advantages, keep) for rewards (N,) ordered in consecutive groups of `group_size`.

    A = (r − mean of its group) / (std + 1e-4), std (population) of the group, or of the whole
    batch with `global_std` (Flow-GRPO's option: groups with nearly equal rewards are not blown
    up). `keep` is False for every member of a group whose rewards are all equal: its
    advantages are all 0, so it would spend compute on no signal (dropped, as DanceGRPO does).

    Rewards (N, k), the parts of a weighted sum, with their `weights` (k,): each part is normalised on
    its own and A = Σ_k w_k·A_k, so the part of largest variance does not dominate; a group is kept
    when any part varies in it."""
    if rewards.ndim == 2:
        weights = torch.ones(rewards.shape[1]) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if len(weights) != rewards.shape[1]:
            raise ValueError(f"{rewards.shape[1]} reward parts but {len(weights)} weights")
        cols = [group_advantages(rewards[:, k], group_size, global_std) for k in range(rewards.shape[1])]
        adv = sum(float(w) * a.double() for w, (a, _) in zip(weights, cols))
        return adv.to(rewards.dtype), torch.stack([keep for _, keep in cols]).any(dim=0)
    if rewards.ndim != 1 or len(rewards) % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    std = r.std(dim=None, unbiased=False) if global_std else r.std(dim=1, keepdim=True, unbiased=False)
    adv = (r - r.mean(dim=1, keepdim=True)) / (std + STD_EPS)
    keep = (r.max(dim=1, keepdim=True).values > r.min(dim=1, keepdim=True).values).expand_as(r)
    return adv.flatten().to(rewards.dtype), keep.flatten()


def step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mean, std²) ‖ N(mean_ref, std²)) per item = Σ (mean − mean_ref)² / (2·std²) over elements
    (`sum`), or its per-element average (`mean`, the log-prob scale of the reference code).

    `std` is the step's own, so for a flow SDE it holds g·sqrt(|dt|): the |dt| that Flow-GRPO's
    KL left out (its issue #78) is in it. Differentiable in `mean` (the policy's)."""
    elem = (mean.float() - mean_ref.float()) ** 2 / (2 * std.float() ** 2)
    dims = tuple(range(1, elem.ndim))
    return elem.sum(dims) if reduction == "sum" else elem.mean(dims)
