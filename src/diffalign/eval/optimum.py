"""The exact KL-regularised optimum on `toy2d` (METHODS.md, last section).

p_ref is the Gaussian mixture sum_k w_k N(mu_k, S_k) and r(x) = -a ||x - c||^2. Then
p*(x) ∝ p_ref(x) exp(r(x) / beta) is again a Gaussian mixture: exp(r/beta) is an
unnormalised Gaussian N(c, (beta / 2a) I), and the product of two Gaussians is
N(m_k, P_k) with P_k = (S_k^-1 + (2a/beta) I)^-1, m_k = P_k (S_k^-1 mu_k + (2a/beta) c),
with weight w_k N(mu_k; c, S_k + (beta / 2a) I), renormalised.
"""

from __future__ import annotations

import torch

from ..models import toy2d
from ..rewards.toy2d import SCALE, TARGET


def tilted_mixture(beta: float, target=TARGET, scale: float = SCALE, weights=None, means=None, covs=None):
    """(weights (K,), means (K, 2), covs (K, 2, 2)) of p* ∝ p_ref exp(r / beta), float64."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    w = (toy2d.WEIGHTS if weights is None else weights).double()
    mu = (toy2d.MEANS if means is None else means).double()
    S = (toy2d.COVS if covs is None else covs).double()
    c = torch.as_tensor(target, dtype=torch.float64)
    lam = 2.0 * scale / beta  # precision of the tilt
    eye = torch.eye(mu.shape[1], dtype=torch.float64)
    S_inv = torch.linalg.inv(S)
    P = torch.linalg.inv(S_inv + lam * eye)
    m = torch.einsum("kij,kj->ki", P, torch.einsum("kij,kj->ki", S_inv, mu) + lam * c)
    marg = torch.distributions.MultivariateNormal(c.expand_as(mu), covariance_matrix=S + eye / lam)
    logw = w.log() + marg.log_prob(mu)
    return torch.softmax(logw, 0), m, P


def sample_optimum(n: int, beta: float, generator: torch.Generator | None = None, **kw) -> torch.Tensor:
    """n points (n, 2) from p*."""
    w, m, P = tilted_mixture(beta, **kw)
    comp = torch.multinomial(w, n, replacement=True, generator=generator)
    z = torch.randn(n, m.shape[1], generator=generator, dtype=torch.float64)
    return (m[comp] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(P)[comp], z)).float()


def optimum_log_prob(x: torch.Tensor, beta: float, **kw) -> torch.Tensor:
    w, m, P = tilted_mixture(beta, **kw)
    dist = torch.distributions.MultivariateNormal(m, covariance_matrix=P)
    return torch.logsumexp(dist.log_prob(x.double().unsqueeze(-2)) + w.log(), -1)


def distance_to_optimum(points: torch.Tensor, beta: float, seed: int = 0, n_proj: int = 256, **kw) -> dict:
    """Sliced Wasserstein distance from `points` to a sample of p* of the same size, and the
    floor: the same distance between two independent samples of p* of that size."""
    g = torch.Generator().manual_seed(seed)
    n = len(points)
    a, b = sample_optimum(n, beta, g, **kw), sample_optimum(n, beta, g, **kw)
    proj = lambda: torch.Generator().manual_seed(seed + 1)
    return {"beta": beta,
            "distance": toy2d.sliced_wasserstein(points, a, n_proj=n_proj, generator=proj()),
            "floor": toy2d.sliced_wasserstein(b, a, n_proj=n_proj, generator=proj())}
