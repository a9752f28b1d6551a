"""The log-prob step, held against diffusers and plain math (the loop: test_sampler.py).

One contract every scheduler family (`diffalign.steps`: DDIM, DDPM, the flow SDE) passes: with the same
noise the step is the scheduler's own `step` (flow: at SDE level 0, its Euler step), with zero noise it
is the mean, and re-scoring a step gives the log-probability it recorded. Flow-only checks: test_flow.py."""

import copy
import math
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffalign.sampling import add_noise, gaussian_log_prob, output_shift, set_timesteps, step_with_logprob, \
    timesteps_ready, training_target, x0_from_output
from diffalign.steps import family_of

SHAPE = (3, 2, 4, 4)


def _ddim(**kw):
    cfg = dict(num_train_timesteps=1000, set_alpha_to_one=False, clip_sample=False, steps_offset=1)
    cfg.update(kw)
    s = DDIMScheduler(**cfg)
    s.set_timesteps(10)
    return s


def _ddpm(**kw):
    s = DDPMScheduler(num_train_timesteps=1000, **kw)
    s.set_timesteps(10)
    return s


def _flow(shift=1.0, own_grid=False):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if own_grid:  # the scheduler's default grid, with its last micro-step σ_min -> 0
        s.set_timesteps(10)
    else:
        set_timesteps(s, 10)
    return s


def _ddim_step(s, out, t, x, eta, noise):
    return s.step(out, t, x, eta=eta, variance_noise=noise).prev_sample


def _ddpm_step(s, out, t, x, eta, noise):
    """diffusers' DDPM step draws its noise itself (no `variance_noise` argument): it is handed `noise`."""
    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", return_value=noise):
        return s.step(out, t, x).prev_sample


def _flow_step(s, out, t, x, eta, noise):
    """The scheduler's Euler (ODE) step, which has no noise; on a copy, since `step` advances its step index."""
    return copy.deepcopy(s).step(out, t, x).prev_sample


@dataclass
class Case:
    name: str
    make: Callable  # () -> a scheduler with 10 inference steps
    own_step: Callable  # (scheduler, output, t, x, eta, noise) -> the scheduler's own prev_sample
    own_eta: float  # the noise level at which our step is the scheduler's own
    eta: float  # the noise level of the likelihood checks
    atol: float  # against the scheduler's own step (0: bitwise)


CASES = [
    *[Case(f"ddim-{i}-eta{eta}", lambda cfg=cfg: _ddim(**cfg), _ddim_step, eta, eta, 1e-5)
      for i, cfg in enumerate([dict(), dict(clip_sample=True, clip_sample_range=1.0),
                               dict(prediction_type="v_prediction", beta_schedule="scaled_linear"),
                               dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample")])
      for eta in (1.0, 0.3)],
    Case("ddpm", _ddpm, _ddpm_step, 1.0, 1.0, 1e-5),
    Case("ddpm-v", lambda: _ddpm(prediction_type="v_prediction", variance_type="fixed_small_log"), _ddpm_step,
           1.0, 1.0, 1e-5),
    Case("flow", _flow, _flow_step, 0.0, 0.7, 0.0),
    Case("flow-shift3", lambda: _flow(3.0), _flow_step, 0.0, 0.7, 0.0),
    Case("flow-shift3-own-grid", lambda: _flow(3.0, own_grid=True), _flow_step, 0.0, 0.7, 0.0),
]
ONE_EACH = [CASES[0], CASES[8], CASES[10]]  # DDIM, DDPM, flow
assert [type(family_of(c.make())).__name__ for c in ONE_EACH] == ["DDIM", "DDPM", "FlowSDE"]


def close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_family_keeps_the_step_contract(case):
    s = case.make()
    g = torch.Generator().manual_seed(0)
    zeros = torch.zeros(SHAPE)
    for k, t in enumerate(s.timesteps):
        x, out, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
        # the same noise: the scheduler's own sample; zero noise: its mean
        own = step_with_logprob(s, out, t, x, eta=case.own_eta, variance_noise=noise, with_logprob=False)
        close(own.prev_sample, case.own_step(s, out, t, x, case.own_eta, noise), case.atol)
        close(own.mean, case.own_step(s, out, t, x, case.own_eta, zeros), case.atol)
        if case.own_eta == 0:
            assert float(own.std.max()) == 0.0
        # at the likelihood's level: zero noise gives the mean; a generator's draw is the noise it hands over
        zero = step_with_logprob(s, out, t, x, eta=case.eta, variance_noise=zeros, with_logprob=False)
        assert torch.equal(zero.prev_sample, zero.mean)
        drawn = step_with_logprob(s, out, t, x, eta=case.eta, generator=torch.Generator().manual_seed(k),
                                  with_logprob=False)
        given = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(k))
        assert torch.equal(drawn.prev_sample, (drawn.mean + drawn.std * given).to(x.dtype))
        with pytest.raises(ValueError, match="eta = 0"):
            step_with_logprob(s, out, t, x, eta=0.0)
        if float(zero.std.min()) == 0:  # DDPM's last step (t = 0): the mean, and no likelihood
            with pytest.raises(ValueError, match="deterministic"):
                step_with_logprob(s, out, t, x, eta=case.eta, variance_noise=noise)
            continue
        # re-scoring the step gives the log-prob it recorded, the Gaussian's (an independent computation)
        step = step_with_logprob(s, out, t, x, eta=case.eta, variance_noise=noise)
        again = step_with_logprob(s, out, t, x, eta=case.eta, prev_sample=step.prev_sample)
        assert torch.equal(again.log_prob, step.log_prob) and torch.equal(again.mean, step.mean)
        normal = torch.distributions.Normal(step.mean.double(), step.std.expand(SHAPE).double())
        expected = normal.log_prob(step.prev_sample.double()).sum(dim=(1, 2, 3))
        torch.testing.assert_close(step.log_prob.double(), expected, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("case", ONE_EACH, ids=lambda c: c.name)
def test_per_sample_timesteps(case):
    s = case.make()
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    ts = s.timesteps[[0, 4, 8]]
    batched = step_with_logprob(s, e, ts, x, eta=case.eta, variance_noise=torch.zeros(SHAPE))
    for b in range(3):
        one = step_with_logprob(s, e[b:b + 1], ts[b], x[b:b + 1], eta=case.eta,
                                variance_noise=torch.zeros(1, *SHAPE[1:]))
        torch.testing.assert_close(batched.mean[b:b + 1], one.mean)
        torch.testing.assert_close(batched.std[b:b + 1], one.std)
        torch.testing.assert_close(batched.log_prob[b:b + 1], one.log_prob)
    with pytest.raises(ValueError, match="timestep must be a scalar or shape"):
        step_with_logprob(s, e, ts[:2], x, eta=case.eta)


@pytest.mark.parametrize("case", [c for c in CASES if "eta0.3" not in c.name], ids=lambda c: c.name)
def test_every_family_reads_its_training_target_and_shifts_its_noise(case):
    """x_t = add_noise(x0, ε, t) and the training target give back x0 and ε (the step's eps_pred), and
    `output_shift(d)` added to the output moves the implied noise by d."""
    s = case.make()
    g = torch.Generator().manual_seed(1)
    x0, noise, d = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t = s.timesteps[[1, 4, 7]]
    x_t = add_noise(s, x0, noise, t)
    target = training_target(s, x0, noise, t)
    torch.testing.assert_close(x0_from_output(s, target, t, x_t), x0, atol=1e-4, rtol=1e-4)

    def eps(out):
        return step_with_logprob(s, out, t, x_t, eta=case.eta, with_logprob=False).eps_pred

    torch.testing.assert_close(eps(target), noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps(target + output_shift(s, d, t, x_t)) - eps(target), d, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ONE_EACH, ids=lambda c: c.name)
def test_set_timesteps_is_ready_until_the_count_changes(case):
    s = case.make()
    set_timesteps(s, 7)
    assert len(s.timesteps) == 7 and timesteps_ready(s, 7) and not timesteps_ready(s, 8)


def test_an_unknown_scheduler_is_refused_by_name():
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="no step family for EulerDiscreteScheduler"):
        step_with_logprob(EulerDiscreteScheduler(), torch.zeros(1, 2), 10, torch.zeros(1, 2), eta=1.0)


@pytest.mark.parametrize("scheduler", [_ddim, _ddpm], ids=["ddim", "ddpm"])
def test_same_generator_same_sample(scheduler):
    """Drawn from a generator, the noise is the one the scheduler's own `step` draws from it."""
    s = scheduler()
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    t = s.timesteps[3]
    ours = step_with_logprob(s, e, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    ref = s.step(e, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)) if scheduler is _ddim else \
        s.step(e, t, x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-5, rtol=1e-5)


def test_ddpm_refuses_another_eta_and_a_learned_variance():
    x = torch.zeros(SHAPE)
    s = _ddpm()
    with pytest.raises(ValueError, match="fixed variance"):
        step_with_logprob(s, x, s.timesteps[0], x, eta=0.5)
    s = _ddpm(variance_type="learned")
    with pytest.raises(ValueError, match="variance_type 'learned' is not supported"):
        step_with_logprob(s, x, s.timesteps[0], x, eta=1.0)


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


def test_ddim_eta_zero_without_a_likelihood_is_plain_ddim():
    s = _ddim()
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    out = step_with_logprob(s, e, s.timesteps[2], x, eta=0.0, with_logprob=False)
    torch.testing.assert_close(out.prev_sample, s.step(e, s.timesteps[2], x, eta=0.0).prev_sample)
