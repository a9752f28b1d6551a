"""Metrics that judge an aligned model on more than its training reward.

All functions are pure (tensors in, floats out) so each can be tested on cases with
known answers:

- `pairwise_diversity`: mean pairwise L2 distance of features within each group
  (prompt), averaged over groups (the DreamSim-style diversity of the papers).
- `frechet_distance`: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between two
  feature sets (FID's formula; here in the held-out classifier's feature space).
- `class_histogram`: fraction of samples per class.
- `win_rate`: fraction of fixed seeds where one model's sample beats the other's.
- `path_kl`: KL between the policy's and the reference's sampling paths, summed over
  steps of the per-step Gaussian KL ||mu_theta - mu_ref||^2 / (2 sigma_t^2).
- `sliced_wasserstein`: distance between point clouds (toy2d: versus the exact optimum).
"""

from __future__ import annotations

import numpy as np
import torch


def pairwise_diversity(features: torch.Tensor, groups: list | None = None) -> float:
    """Mean over groups of the mean pairwise L2 distance between distinct members.

    Groups with a single member are skipped; at least one group must have two."""
    f = features.detach().double().flatten(1).cpu()
    if groups is None:
        groups = [0] * len(f)
    if len(groups) != len(f):
        raise ValueError(f"pairwise_diversity: {len(f)} features but {len(groups)} group labels")
    per_group = []
    for g in dict.fromkeys(groups):
        idx = [i for i, h in enumerate(groups) if h == g]
        if len(idx) < 2:
            continue
        d = torch.cdist(f[idx], f[idx])
        n = len(idx)
        per_group.append(float(d.sum() / (n * (n - 1))))
    if not per_group:
        raise ValueError("pairwise_diversity needs at least two samples in one group")
    return float(np.mean(per_group))


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.detach().double().flatten(1).cpu().numpy()
    if len(f) < 2:
        raise ValueError("Fréchet distance needs at least two samples per set")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^1/2).

    tr((A B)^1/2) = sum of sqrt(eigenvalues of A^1/2 B A^1/2), which is symmetric PSD,
    so this is exact and stable for singular covariances (fewer samples than dims)."""
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"Fréchet distance: feature sizes differ ({mu_a.shape} vs {mu_b.shape})")
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (n, d) and b (m, d)."""
    return frechet_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def class_histogram(labels: torch.Tensor, num_classes: int) -> list[float]:
    """Fraction of samples in each class 0..num_classes-1."""
    counts = torch.bincount(labels.flatten().long().cpu(), minlength=num_classes)[:num_classes]
    return [float(c) / max(1, labels.numel()) for c in counts]


def win_rate(base: list[float] | None, other: list[float] | None) -> float | None:
    """Fraction of the fixed seeds where `other`'s sample has a higher reward than `base`'s
    (same noise, same prompt); ties count half. None when either list is missing."""
    if not base or not other or len(base) != len(other):
        return None
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(other, base)) / len(other)


def gaussian_step_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor,
                     std_q: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std_q^2 I)) per sample, stds one per sample:
    sum ||dmu||^2 / (2 std^2) when std_q is None (the same std), else
    d·(log(std_q/std) + std^2/(2 std_q^2) - 1/2) + ||dmu||^2 / (2 std_q^2) over d elements."""
    d = (mean_p - mean_q).flatten(1).double()
    s = torch.as_tensor(std, dtype=torch.float64, device=d.device).flatten()
    if std_q is None:
        return (d ** 2).sum(1) / (2 * s ** 2)
    q = torch.as_tensor(std_q, dtype=torch.float64, device=d.device).flatten()
    return d.shape[1] * (torch.log(q / s) + s ** 2 / (2 * q ** 2) - 0.5) + (d ** 2).sum(1) / (2 * q ** 2)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between point clouds a (n, d) and b (m, d).

    Averages the squared 1-D W2 distance over `n_proj` random directions and returns
    its square root. Unequal sizes are compared through quantiles.
    """
    dirs = random_directions(a.flatten(1).shape[1], n_proj, generator)
    return sliced_from_sorted(sorted_projections(a, dirs), sorted_projections(b, dirs))


def random_directions(dim: int, n_proj: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(dim, n_proj) unit directions."""
    dirs = torch.randn(dim, n_proj, generator=generator)
    return dirs / dirs.norm(dim=0, keepdim=True)


def sorted_projections(x: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """x (n, d) projected on `dirs` and sorted per direction (numpy's sort: ~4x torch's on CPU here)."""
    x = x.detach().float().cpu().flatten(1)
    return torch.from_numpy(np.sort((x @ dirs).numpy(), axis=0))


def sliced_from_sorted(pa: torch.Tensor, pb: torch.Tensor) -> float:
    """`sliced_wasserstein` from two `sorted_projections` on the same directions."""
    if pa.shape[0] != pb.shape[0]:
        m = max(pa.shape[0], pb.shape[0])
        q = (torch.arange(m, dtype=torch.float32) + 0.5) / m
        pa = torch.quantile(pa, q, dim=0)
        pb = torch.quantile(pb, q, dim=0)
    return float((pa - pb).pow(2).mean().sqrt())
