"""Evaluation metrics on cases with known answers, the path KL by hand, toy2d's exact optimum."""

import contextlib
import math

import pytest
import torch

from diffalign.eval import metrics
from diffalign.eval.kl import path_kl
from diffalign.eval.optimum import distance_to_optimum, optimum_log_prob, sample_optimum, tilted_mixture
from diffalign.models import toy2d
from diffalign.rewards.toy2d import quadratic
from diffalign.sampler import Sampler
from tiny_models import tiny_model


def test_pairwise_diversity_known_answers():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert metrics.pairwise_diversity(x) == pytest.approx(5.0)
    assert metrics.pairwise_diversity(torch.ones(6, 3)) == 0.0
    # three points on a line 0, 1, 3: pair distances 1, 3, 2 -> mean 2
    assert metrics.pairwise_diversity(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)
    # per group, then averaged: group a spread 5, group b spread 0 -> 2.5 (never across groups)
    y = torch.tensor([[0.0, 0.0], [3.0, 4.0], [100.0, 0.0], [100.0, 0.0]])
    assert metrics.pairwise_diversity(y, ["a", "a", "b", "b"]) == pytest.approx(2.5)
    assert metrics.pairwise_diversity(2 * y, ["a", "a", "b", "b"]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="two samples"):
        metrics.pairwise_diversity(y, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="group labels"):
        metrics.pairwise_diversity(y, ["a"])


def test_frechet_known_answers():
    # diagonal covariances: ||dmu||^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + (1-2)^2 + (2-1)^2 = 7
    d = metrics.frechet_from_stats([0.0, 0.0], torch.diag(torch.tensor([1.0, 4.0])).numpy(),
                                   [1.0, 2.0], torch.diag(torch.tensor([4.0, 1.0])).numpy())
    assert d == pytest.approx(7.0, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # shifted Gaussians N(0, I) vs N(m, I): ||m||^2 = 4 (sampling error only)
    b = torch.randn(20000, 3, generator=g) + torch.tensor([2.0, 0.0, 0.0])
    c = torch.randn(20000, 3, generator=g)
    assert metrics.frechet_distance(b, c) == pytest.approx(4.0, abs=0.1)
    # fewer samples than dimensions: singular covariances still give a finite, nonnegative value
    assert metrics.frechet_distance(torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g)) >= 0
    with pytest.raises(ValueError, match="feature sizes"):
        metrics.frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


def test_class_histogram_and_win_rate():
    assert metrics.class_histogram(torch.tensor([0, 2, 2, 1]), 3) == [0.25, 0.25, 0.5]
    assert metrics.class_histogram(torch.tensor([3, 3]), 4) == [0.0, 0.0, 0.0, 1.0]
    assert metrics.win_rate([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 5.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert metrics.win_rate([1.0], None) is None
    assert metrics.win_rate([1.0, 2.0], [1.0]) is None


class ConstEps(torch.nn.Module):
    """eps = value everywhere, whatever x, t, c; `value` is switched by the reference context."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the model finds its device from a parameter

    def forward(self, x, t, c):
        return torch.full_like(x, self.value)


def _constant_shift_kl(s, T, eta, shift) -> float:
    """Path KL when the two models' eps differ by the constant shift(a_t) at every element: DDIM's
    mean = sqrt(a_prev) (x - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - s^2) eps moves every
    element by coef * shift, with the same std s for both models; 16 elements per (1, 4, 4) sample."""
    s.set_timesteps(T)
    ac = s.alphas_cumprod.double()
    total = 0.0
    for t in s.timesteps.tolist():
        prev = t - s.config.num_train_timesteps // T
        a_t, a_p = float(ac[t]), float(ac[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
        var = eta ** 2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        coef = -math.sqrt(a_p) * math.sqrt(1 - a_t) / math.sqrt(a_t) + math.sqrt(1 - a_p - var)
        total += 16 * (coef * shift(a_t)) ** 2 / (2 * var)
    return total


def test_path_kl_matches_hand_computation():
    model = tiny_model()
    model.denoiser = ConstEps(0.3)

    @contextlib.contextmanager
    def reference():
        model.denoiser.value = 0.0
        try:
            yield
        finally:
            model.denoiser.value = 0.3

    T, eta, c = 5, 1.0, 0.3
    S = Sampler(num_steps=T, eta=eta, guidance_scale=1.0)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    kl = path_kl(model, S, reference, S, ["0", "1", "2"], gens)
    expected = _constant_shift_kl(model.scheduler, T, eta, lambda a_t: c)
    assert kl.shape == (3,)
    assert torch.allclose(kl, torch.full((3,), float(expected), dtype=kl.dtype), rtol=1e-4)
    # the same model on both sides: zero
    assert path_kl(model, S, contextlib.nullcontext, S, ["0"], gens[:1]).item() == 0.0
    with pytest.raises(ValueError, match="eta > 0"):
        path_kl(model, S.replace(eta=0.0), reference, S.replace(eta=0.0), ["0"], gens[:1])
    # the aligned model is (weights, sampler): a score correction s moves eps by -sqrt(1 - a_t) s, so
    # the same weights with a corrected sampler are at KL sum 16 (coef sqrt(1 - a_t) s)^2 / (2 var)
    corr = 0.5
    corrected = S.replace(correction=lambda m, x, t, cond: torch.full_like(x, corr))
    kl = path_kl(model, corrected, contextlib.nullcontext, S, ["0", "1"], gens[:2])
    expected = _constant_shift_kl(model.scheduler, T, eta, lambda a_t: math.sqrt(1 - a_t) * corr)
    assert torch.allclose(kl, torch.full((2,), float(expected), dtype=kl.dtype), rtol=1e-4)


def test_gaussian_step_kl_with_different_stds():
    """KL(N(m1, s1^2) || N(m2, s2^2)) per element: log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    m1, m2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    s1, s2 = torch.tensor([0.5]), torch.tensor([2.0])
    want = 2 * (math.log(4) + 0.25 / 8 - 0.5) + 1 / 8
    assert metrics.gaussian_step_kl(m1, m2, s1, s2).item() == pytest.approx(want, rel=1e-9)
    assert metrics.gaussian_step_kl(m1, m2, s2, s2).item() == pytest.approx(metrics.gaussian_step_kl(m1, m2, s2).item())


def test_tilted_mixture_is_the_normalised_product():
    """p* from the closed form equals p_ref * exp(r / beta), normalised on a fine grid."""
    beta = 0.7
    xs = torch.linspace(-4, 5, 451, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    log_unnorm = toy2d.log_prob(grid.float()).double() + quadratic(grid).double() / beta
    cell = float((xs[1] - xs[0]) ** 2)
    log_z = torch.logsumexp(log_unnorm, 0) + math.log(cell)
    pts = torch.tensor([[1.5, 0.0], [0.8, 1.2], [1.9, 1.8], [-0.5, 1.0]], dtype=torch.float64)
    numeric = toy2d.log_prob(pts.float()).double() + quadratic(pts).double() / beta - log_z
    assert torch.allclose(optimum_log_prob(pts, beta), numeric, atol=2e-3)
    # a huge beta leaves p_ref unchanged; a small one puts the mass near the target
    w, m, P = tilted_mixture(1e9)
    assert torch.allclose(w, toy2d.WEIGHTS.double(), atol=1e-6)
    assert torch.allclose(m, toy2d.MEANS.double(), atol=1e-6)
    pts = sample_optimum(4000, 0.05, torch.Generator().manual_seed(0))
    assert quadratic(pts).mean() > quadratic(toy2d.sample_data(4000, torch.Generator().manual_seed(0))).mean() + 2
    # sample mean matches the closed-form mixture mean
    w, m, _ = tilted_mixture(beta)
    mean = (w[:, None] * m).sum(0)
    assert torch.allclose(sample_optimum(50000, beta, torch.Generator().manual_seed(1)).mean(0).double(), mean, atol=0.02)
    with pytest.raises(ValueError, match="beta"):
        tilted_mixture(0.0)


def test_distance_to_optimum_floor():
    beta = 1.0
    exact = sample_optimum(2000, beta, torch.Generator().manual_seed(5))
    d = distance_to_optimum(exact, beta)
    assert d["floor"] < 0.1
    assert d["distance"] < 3 * d["floor"] + 0.02  # an exact sample sits at the floor
    far = distance_to_optimum(toy2d.sample_data(2000, torch.Generator().manual_seed(5)), beta)
    assert far["distance"] > 5 * far["floor"]  # the base distribution is far from p*


def test_yardstick_is_averaged_over_draws():
    """One draw of p* moves the distance a lot; the mean over 32 draws sits near the floor for an exact
    sample (ratio ≈ 1), its spread is reported, and every model meets the same draws."""
    exact = sample_optimum(1000, 1.0, torch.Generator().manual_seed(7))
    one = [distance_to_optimum(exact, 1.0, seed=s, draws=1) for s in range(8)]
    assert all(o["distance_sd"] == 0.0 and o["draws"] == 1 for o in one)
    singles = [o["ratio"] for o in one]
    avg = distance_to_optimum(exact, 1.0)
    assert avg["draws"] == toy2d.YARDSTICK_DRAWS == 32 and avg["distance_sd"] > 0
    assert max(singles) - min(singles) > 0.2  # a single yardstick is noisy...
    assert 0.8 < avg["ratio"] < 1.25  # ...the averaged one puts an exact sample at the floor
    assert distance_to_optimum(exact, 1.0) == avg  # deterministic: the same yardsticks for every model
    uncached = toy2d.yardstick_distance(exact, lambda n, g: sample_optimum(n, 1.0, g), 0, 256, 32)
    assert uncached == {k: v for k, v in avg.items() if k != "beta"}  # the cached draws are the same draws
    fid = toy2d.distance_to_data(toy2d.sample_data(1000, torch.Generator().manual_seed(3)))
    assert 0.8 < fid["data_ratio"] < 1.25 and fid["data_ratio"] == fid["data_distance"] / fid["data_floor"]
    with pytest.raises(ValueError, match="draw"):
        distance_to_optimum(exact, 1.0, draws=0)
