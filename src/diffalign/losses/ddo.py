"""DDO's math on distributions (Kawata, Oko, Nitanda & Suzuki, "Direct Distributional Optimization for
Provable Alignment of Diffusion Models", ICLR 2025, arXiv 2502.02954; METHODS.md §8).

Problem: minimise F(q) = L(q) + β·KL(q‖p_ref) over distributions q. Every iterate is
q_k ∝ exp(−f_k)·p_ref, and h_k = log q_k/p_ref = −f_k − log Z_k with Z_k = E_ref[exp(−f_k)].

First variations δL/δq(q)(y) (each defined up to an additive constant):

- reward, L = −E_q[r]:  δL/δq(y) = −r(y). It does not depend on q.
- DPO on densities, pairs (x_w, x_l) of reference samples (what `diffalign data pairs`
  writes): L(q) = −E log σ(γ(h(x_w) − h(x_l))). Writing the data as ordered draws
  (y, x') ~ p_ref × p_ref with a label, and differentiating h(y) = log q(y) − log p_ref(y)
  in q(y) (∂h(y)/∂q(y) = 1/q(y), and y is either member of a pair):
      δL/δq(y) = −2γ·(p_ref(y)/q(y))·E_{x'}[ℓ(y≻x')σ(−γ(h(y)−h(x'))) − ℓ(x'≻y)σ(−γ(h(x')−h(y)))],
  with p_ref(y)/q(y) = exp(−h(y)). At a data pair, with its own label as the one-sample
  estimate of the expectation and s = σ(−γ(h(x_w) − h(x_l))):
      δL/δq(x_w) = −2γ·exp(−h(x_w))·s,    δL/δq(x_l) = +2γ·exp(−h(x_l))·s.
  With Bradley–Terry labels P(y≻x') = σ(r(y) − r(x')) and β → 0 the minimiser is h = r/γ
  (the bracket vanishes there), i.e. q = p_ref·exp(r/γ)/Z; for β > 0 it is shrunk towards
  p_ref (`dpo_population_first_variation` computes the exact bracket on a grid).
- KTO, labelled reference samples (y, desirable or not), reference point z = KL(q‖p_ref)
  held fixed within an iteration (as KTO detaches it): L(q) = E[λ_y(1 − σ(±γ(h(y) − z)))]:
      δL/δq(y) = −γ·λ_D·exp(−h(y))·σ'(γ(h(y) − z))   for a desirable y,
      δL/δq(y) = +γ·λ_U·exp(−h(y))·σ'(γ(z − h(y)))   for an undesirable y,
  with σ'(u) = σ(u)σ(−u).
- Every first variation is clipped to [−20, 20] (the paper's stabiliser; exp(−h) is
  unbounded where q has little mass).

Dual averaging (Nesterov's; on measures as in Nitanda et al.'s particle dual averaging,
which DDO builds on). With weights w_j > 0 and a proximal entropy weight β' ≥ β, the ideal
update linearises L at every past iterate and keeps the KL exact:

    q̂_{k+1} = argmin_q Σ_{j≤k} w_j (∫ δL/δq(q_j) dq + β KL(q‖p_ref)) + β' KL(q‖p_ref)
            ∝ exp(−g^(k))·p_ref,    g^(k) = Σ_{j≤k} w_j δL/δq(q_j) / S_k,   S_k = β W_k + β',

W_k = Σ_{j≤k} w_j. The two weightings:
- Option 1 (uniform, w_j = 1):   W_k = k,        S_k = βk + β'.
- Option 2 (linear, w_j = j):    W_k = k(k+1)/2, S_k = βk(k+1)/2 + β'.
  Later iterates weigh more; for the reward objective the tilt after k iterations is
  r/β · W_k/(W_k + β'/β): with β' = β, k/(k+1) (Option 1) against k(k+1)/(k(k+1)+2)
  (Option 2), so Option 2 reaches the optimum's tilt faster.
Recurrence (what is regressed; S_0 = β', g^(0) = 0):

    g^(k) = (S_{k−1}·g^(k−1) + w_k·δL/δq(q_k)) / S_k,

and f_{k+1} is a network fitted to g^(k), with f_k standing in for g^(k−1) (exactly so
when the regression is exact; the grid test in tests/test_ddo.py holds the recurrence to
the explicit sums). The fixed point satisfies δL/δq(q*) + β log(q*/p_ref) = const: the
first-order condition of F. This derivation is ours from the dual-averaging literature:
the paper's own Eq. (3)/(4) text is not reproduced in this repository.
"""

from __future__ import annotations

import torch

OPTIONS = (1, 2)
CLIP = 20.0


def da_weight(k: int, option: int) -> float:
    """w_k: 1 (Option 1) or k (Option 2)."""
    _check(option)
    return 1.0 if option == 1 else float(k)


def da_scale(k: int, option: int, beta: float, beta_prime: float) -> float:
    """S_k = β·W_k + β' (S_0 = β')."""
    _check(option)
    w_total = k if option == 1 else k * (k + 1) / 2
    return beta * w_total + beta_prime


def da_target(prev: torch.Tensor, first_variation: torch.Tensor, k: int, option: int, beta: float,
              beta_prime: float) -> torch.Tensor:
    """g^(k) = (S_{k−1}·g^(k−1) + w_k·δL/δq(q_k)) / S_k at the same points (k ≥ 1)."""
    if k < 1:
        raise ValueError(f"dual averaging iterations start at k = 1, got {k}")
    s_prev, s_k = da_scale(k - 1, option, beta, beta_prime), da_scale(k, option, beta, beta_prime)
    return (s_prev * prev + da_weight(k, option) * first_variation) / s_k


def clip(v: torch.Tensor, bound: float = CLIP) -> torch.Tensor:
    return v.clamp(-bound, bound)


def reward_first_variation(rewards: torch.Tensor) -> torch.Tensor:
    return clip(-rewards)


def _exp_neg(h: torch.Tensor) -> torch.Tensor:
    return torch.exp((-h).clamp(max=60.0))  # beyond e^60 the clip at 20 decides anyway


def dpo_first_variation(h_w: torch.Tensor, h_l: torch.Tensor, gamma: float):
    """(δL/δq at the winners, at the losers) from log-ratios h = log q/p_ref at a pair's members."""
    s = torch.sigmoid(-gamma * (h_w - h_l))
    return clip(-2 * gamma * _exp_neg(h_w) * s), clip(2 * gamma * _exp_neg(h_l) * s)


def kto_first_variation(h: torch.Tensor, desirable: torch.Tensor, gamma: float, z: float,
                        lambda_d: float = 1.0, lambda_u: float = 1.0) -> torch.Tensor:
    u = gamma * (h - z)
    slope = torch.sigmoid(u) * torch.sigmoid(-u)
    sign = torch.where(desirable, -lambda_d, lambda_u).to(h.dtype)
    return clip(sign * gamma * _exp_neg(h) * slope)


def dpo_population_first_variation(h: torch.Tensor, r: torch.Tensor, p_ref: torch.Tensor,
                                   gamma: float) -> torch.Tensor:
    """The exact δL/δq on a finite grid (points with reference masses p_ref) for pairs drawn from
    p_ref × p_ref with Bradley–Terry labels P(y≻x') = σ(r(y) − r(x')); no clipping."""
    dr = r[:, None] - r[None, :]
    dh = h[:, None] - h[None, :]
    bracket = torch.sigmoid(dr) * torch.sigmoid(-gamma * dh) - torch.sigmoid(-dr) * torch.sigmoid(gamma * dh)
    return -2 * gamma * torch.exp(-h) * (bracket * p_ref[None, :]).sum(1)


def log_ratio(f: torch.Tensor, log_z: float | torch.Tensor) -> torch.Tensor:
    """h = log q/p_ref = −f − log Z."""
    return -f - log_z


def _check(option: int) -> None:
    if option not in OPTIONS:
        raise ValueError(f"dual averaging option must be 1 or 2, got {option!r}")
