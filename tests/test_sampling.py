"""The log-prob step, held against diffusers and plain math (the loop: test_sampler.py)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffalign.sampling import gaussian_log_prob, step_with_logprob

SHAPE = (3, 2, 4, 4)

DDIM_CONFIGS = [
    dict(),
    dict(clip_sample=True, clip_sample_range=1.0),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
]


def _ddim(**kw):
    cfg = dict(num_train_timesteps=1000, set_alpha_to_one=False, clip_sample=False, steps_offset=1)
    cfg.update(kw)
    s = DDIMScheduler(**cfg)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("cfg", DDIM_CONFIGS)
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_ddim_matches_diffusers_step(cfg, eta):
    s = _ddim(**cfg)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        x = torch.randn(SHAPE, generator=g)
        out_model = torch.randn(SHAPE, generator=g)
        noise = torch.randn(SHAPE, generator=g)
        ours = step_with_logprob(s, out_model, t, x, eta=eta, variance_noise=noise)
        ref = s.step(out_model, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, atol=1e-5, rtol=1e-5)
        # the mean is the step with zero noise
        ref_mean = s.step(out_model, t, x, eta=eta, variance_noise=torch.zeros(SHAPE)).prev_sample
        torch.testing.assert_close(ours.mean, ref_mean, atol=1e-5, rtol=1e-5)
        # and the log-prob is an independent Gaussian computation
        normal = torch.distributions.Normal(ours.mean.double(), ours.std.expand(SHAPE).double())
        expected = normal.log_prob(ours.prev_sample.double()).sum(dim=(1, 2, 3))
        torch.testing.assert_close(ours.log_prob.double(), expected, atol=1e-3, rtol=1e-5)


def test_ddim_same_generator_same_sample():
    s = _ddim()
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    t = s.timesteps[3]
    ours = step_with_logprob(s, e, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    ref = s.step(e, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(ours.prev_sample, ref, atol=1e-5, rtol=1e-5)


def test_ddpm_matches_diffusers_step():
    s = DDPMScheduler(num_train_timesteps=1000)
    s.set_timesteps(10)
    for t in s.timesteps:
        x, e = torch.randn(SHAPE), torch.randn(SHAPE)
        ref = s.step(e, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        if int(t) == 0:  # deterministic final step: the mean, and no likelihood
            ours = step_with_logprob(s, e, t, x, eta=1.0, with_logprob=False)
            torch.testing.assert_close(ours.mean, ref, atol=1e-5, rtol=1e-5)
            with pytest.raises(ValueError, match="deterministic"):
                step_with_logprob(s, e, t, x, eta=1.0)
            continue
        ours = step_with_logprob(s, e, t, x, eta=1.0, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours.prev_sample, ref, atol=1e-5, rtol=1e-5)


def test_log_prob_hand_value_and_reductions():
    x = torch.tensor([[1.0, 2.0]])
    mean = torch.tensor([[0.0, 2.0]])
    std = torch.tensor([[0.5]])
    # element 1: -(1)^2/(2*0.25) - log 0.5 - log sqrt(2 pi); element 2: -log 0.5 - log sqrt(2 pi)
    e1 = -2.0 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    e2 = -math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(x, mean, std, "sum").item() == pytest.approx(e1 + e2, abs=1e-6)
    assert gaussian_log_prob(x, mean, std, "mean").item() == pytest.approx((e1 + e2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mean, std, "max")


def test_eta_zero_refused_with_clear_error():
    s = _ddim()
    with pytest.raises(ValueError, match="eta = 0"):
        step_with_logprob(s, torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE), eta=0.0)
    # without a likelihood, eta = 0 is plain DDIM and matches diffusers
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    out = step_with_logprob(s, e, s.timesteps[2], x, eta=0.0, with_logprob=False)
    torch.testing.assert_close(out.prev_sample, s.step(e, s.timesteps[2], x, eta=0.0).prev_sample)


def test_per_sample_timesteps():
    s = _ddim()
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    ts = s.timesteps[[0, 4, 9]]
    batched = step_with_logprob(s, e, ts, x, eta=1.0, variance_noise=torch.zeros(SHAPE))
    for b in range(3):
        one = step_with_logprob(s, e[b:b + 1], ts[b], x[b:b + 1], eta=1.0, variance_noise=torch.zeros(1, *SHAPE[1:]))
        torch.testing.assert_close(batched.mean[b:b + 1], one.mean)
        torch.testing.assert_close(batched.log_prob[b:b + 1], one.log_prob)
