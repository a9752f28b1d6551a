"""The flow-matching step as a Gaussian policy (diffalign.flow through sampling.step_with_logprob):
the SDE keeps the ODE's marginals, hand-worked values, re-scoring through the sampler gives ratio 1,
the |dt| in the std, fp32 log-probs from bf16 outputs. That the ODE limit (eta = 0) is diffusers' own
Euler step, bitwise, is in the contract every family passes (test_sampling.py)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign import flow
from diffalign.models import load_model, toy2d
from diffalign.sampler import Sampler
from diffalign.sampling import add_noise, alpha_bar, noise_coefficient, step_with_logprob, training_target, \
    x0_from_output


def scheduler(steps=10, shift=1.0):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    return s


def test_hand_worked_step_values():
    """σ = 0.5 -> 0.4 (dt = -0.1), x = 1, v = 2, flow-grpo a = 1: g = sqrt(0.5/0.5) = 1,
    ε = x + (1 - σ)v = 2, mean = x + dt·v + dt·g²/(2σ)·ε = 1 - 0.2 - 0.2 = 0.6, std = g·sqrt(0.1)."""
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    s.set_timesteps(sigmas=[0.5, 0.4])
    t = s.timesteps[0]
    x, v = torch.ones(1, 1), torch.full((1, 1), 2.0)
    out = step_with_logprob(s, v, t, x, eta=1.0, prev_sample=torch.full((1, 1), 0.7))
    assert float(out.mean) == pytest.approx(0.6, abs=1e-6)
    assert float(out.std) == pytest.approx(math.sqrt(0.1), abs=1e-6)
    lp = -0.1**2 / (2 * 0.1) - 0.5 * math.log(0.1) - 0.5 * math.log(2 * math.pi)
    assert float(out.log_prob) == pytest.approx(lp, abs=1e-5)
    assert float(out.x0_pred) == pytest.approx(0.0) and float(out.eps_pred) == pytest.approx(2.0)
    dance = step_with_logprob(s, v, t, x, eta=0.5, sde="dance", with_logprob=False)  # g = 0.5
    assert float(dance.mean) == pytest.approx(1 - 0.2 - 0.1 * 0.25 / 1.0 * 2, abs=1e-6)
    assert float(dance.std) == pytest.approx(0.5 * math.sqrt(0.1), abs=1e-6)


def test_std_carries_sqrt_dt_and_sigma_one_uses_the_next_sigma():
    s = scheduler(steps=4)  # sigmas 1, 0.667, 0.334, 0.001, then 0
    x = torch.zeros(2, 3)
    sig = s.sigmas
    for i, t in enumerate(s.timesteps):
        std = step_with_logprob(s, torch.zeros_like(x), t, x, eta=0.7, with_logprob=False).std
        dt = float(sig[i] - sig[i + 1])
        denom = 1 - (float(sig[1]) if float(sig[i]) >= 1 else float(sig[i]))
        assert float(std.flatten()[0]) == pytest.approx(0.7 * math.sqrt(float(sig[i]) / denom) * math.sqrt(dt), rel=1e-5)
        assert math.isfinite(float(std.flatten()[0]))


def test_drift_is_the_score_corrected_velocity_and_sign_convention():
    """With the exact velocity of a Gaussian N(0, 1) data distribution (x_σ ~ N(0, (1-σ)² + σ²)),
    the SDE mean must move x towards where the ODE moves it, plus -½g²·score·dt (dt < 0)."""
    s = scheduler(steps=10)
    t = s.timesteps[3]
    sig, nxt, _ = flow.schedule_sigmas(s, t, torch.zeros(1, 1))
    sig, nxt = float(sig), float(nxt)
    var = (1 - sig) ** 2 + sig**2
    x = torch.tensor([[1.5]])
    # exact velocity: E[ε - x0 | x] with x0, ε ~ N(0, 1): (σ - (1 - σ)) x / var
    v = (sig - (1 - sig)) * x / var
    score = -x / var
    g = 0.7 * math.sqrt(sig / (1 - sig))
    mean = step_with_logprob(s, v, t, x, eta=0.7, with_logprob=False).mean
    dt = nxt - sig
    assert float(mean) == pytest.approx(float(x + dt * (v - 0.5 * g**2 * score)), rel=1e-5)
    assert dt < 0


def test_conversions():
    s = scheduler()
    x0, noise = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([900.0, 500.0, 100.0])
    xt = add_noise(s, x0, noise, t)
    sig = (t / 1000).view(-1, 1)
    assert torch.allclose(xt, (1 - sig) * x0 + sig * noise)
    v = training_target(s, x0, noise, t)
    assert torch.allclose(x0_from_output(s, v, t, xt), x0, atol=1e-6)
    assert torch.allclose(noise_coefficient(s, t, xt), sig)
    a = alpha_bar(s, t, xt)
    assert torch.allclose(a, (1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2))


def test_rescoring_reproduces_the_log_prob_and_refuses_eta_zero():
    m = load_model("toy2d-flow", progress=False)
    sampler = Sampler(num_steps=10, eta=0.7)
    with torch.no_grad():
        traj = sampler.sample(m, [""] * 16, generator=torch.Generator().manual_seed(0))
        for i in range(traj.num_steps):
            assert torch.equal(sampler.rescore(m, traj, i), traj.log_probs[:, i])
        # per-sample timesteps (the rows' steps differ)
        steps = torch.arange(16) % traj.num_steps
        assert torch.equal(sampler.rescore(m, traj, steps), traj.log_probs[torch.arange(16), steps])
    with pytest.raises(ValueError, match="eta > 0"):
        step_with_logprob(m.scheduler, torch.zeros(2, 2), m.scheduler.timesteps[0], torch.zeros(2, 2), eta=0.0)
    with pytest.raises(ValueError, match="not on the scheduler's current schedule"):
        step_with_logprob(m.scheduler, torch.zeros(2, 2), 123.4, torch.zeros(2, 2), eta=0.7)


def test_log_probs_are_fp32_from_bf16_outputs():
    s = scheduler(steps=20)
    x = torch.randn(4, 16, 8, 8)
    v = torch.randn(4, 16, 8, 8).to(torch.bfloat16)
    t = s.timesteps[-1]  # the last step: the smallest std, where bf16 would lose it
    out = step_with_logprob(s, v, t, x, eta=0.7, generator=torch.Generator().manual_seed(0))
    assert out.log_prob.dtype == torch.float32 and torch.isfinite(out.log_prob).all()
    again = step_with_logprob(s, v, t, x, eta=0.7, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_sde_keeps_the_odes_marginals_on_toy2d():
    """SDE samples (Flow-GRPO a = 0.7, DanceGRPO η = 0.7) against ODE samples: sliced Wasserstein
    within 1.5x the floor (two independent ODE sample sets)."""
    m = load_model("toy2d-flow", progress=False)
    n = 2000
    proj = lambda: torch.Generator().manual_seed(7)  # noqa: E731

    def draw(eta, seed, sde="flow-grpo"):
        with torch.no_grad():
            return Sampler(num_steps=20, eta=eta, sde=sde).sample(
                m, [""] * n, generator=torch.Generator().manual_seed(seed), with_logprob=False).final

    ode_a, ode_b = draw(0.0, 1), draw(0.0, 2)
    floor = toy2d.sliced_wasserstein(ode_a, ode_b, generator=proj())
    for sde in ("flow-grpo", "dance"):
        d = toy2d.sliced_wasserstein(draw(0.7, 3, sde), ode_a, generator=proj())
        assert d < 1.5 * floor, (sde, d, floor)
    # and the flow model itself fits its data
    assert toy2d.sliced_wasserstein(ode_a, toy2d.sample_data(n, torch.Generator().manual_seed(0)),
                                    generator=proj()) < 0.12


def test_mix_window_runs_the_ode_outside_it():
    m = load_model("toy2d-flow", progress=False)
    sampler = Sampler(num_steps=10, eta=0.7, sde_steps=(2, 3))
    with torch.no_grad():
        traj = sampler.sample(m, [""] * 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.log_probs[:, 2:4]).all()
    assert torch.isnan(traj.log_probs[:, :2]).all() and torch.isnan(traj.log_probs[:, 4:]).all()
    ode = Sampler(num_steps=10, eta=0.0)
    # outside the window the step is the ODE's: the same x_{i+1} from the same x_i
    i = 6
    with torch.no_grad():
        x_next = ode.step(m, traj.latents[:, i], traj.timesteps[i], None, with_logprob=False).prev_sample
    assert torch.equal(x_next, traj.latents[:, i + 1])
    with torch.no_grad():
        assert torch.equal(sampler.rescore(m, traj, 2), traj.log_probs[:, 2])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_samplers_grid_has_no_last_micro_step(shift):
    """The scheduler's default grid ends σ_min = 0.001 -> 0 (dt −0.001 against −0.0526): its last step's
    variance is ~3,000× smaller than the one before. The sampler's grid (σ = linspace(1, 1/N, N), shifted,
    then 0) gives every step at shift 1 the same |dt|; the last step's variance stays within a small factor
    of the previous one's and its dμ/dv is −|dt|·(1 + g²(1 − σ)/(2σ)), not −0.001."""
    default = scheduler(steps=20, shift=shift)
    d_sig = default.sigmas
    assert float(d_sig[-2] - d_sig[-1]) < 0.2 * float(d_sig[-3] - d_sig[-2])  # the micro-step is there
    m = SimpleModel(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))
    s = Sampler(num_steps=20, eta=0.7)
    ts = s.timesteps(m)
    sig = m.scheduler.sigmas
    assert len(ts) == 20 and float(sig[0]) == pytest.approx(1.0) and float(sig[-1]) == 0.0
    dts = sig[:-1] - sig[1:]
    if shift == 1.0:
        torch.testing.assert_close(dts, torch.full_like(dts, 1 / 20), rtol=0, atol=1e-6)
    x = torch.zeros(1, 2)
    var = [float(step_with_logprob(m.scheduler, torch.zeros_like(x), t, x, eta=0.7, with_logprob=False).std) ** 2
           for t in ts]
    assert var[-1] > 0.2 * var[-2]
    slope = [float((step_with_logprob(m.scheduler, torch.ones_like(x), t, x, eta=0.7, with_logprob=False).mean
                    - step_with_logprob(m.scheduler, torch.zeros_like(x), t, x, eta=0.7, with_logprob=False).mean)[0, 0])
             for t in ts[-2:]]  # dμ/dv of the last two steps
    assert slope[1] < 0 and abs(slope[1]) > 0.2 * abs(slope[0])
    # a pipeline (or anyone) that set the scheduler's own grid is put back on ours before the next step
    m.scheduler.set_timesteps(20)
    assert not flow.on_grid(m.scheduler, 20)
    s.step(m, x, ts[-1], None, with_logprob=False)
    assert flow.on_grid(m.scheduler, 20) and torch.equal(m.scheduler.sigmas, sig)


class SimpleModel:
    """Just enough of a model for `Sampler.timesteps`/`step` with an all-zero velocity."""

    def __init__(self, sched):
        self.scheduler, self.device = sched, torch.device("cpu")

    def null_condition(self, n):
        return None

    def predict_noise(self, x, t, cond):
        return torch.zeros_like(x)


def test_output_shift_is_finite_at_sigma_one_and_shifts_the_implied_noise_elsewhere():
    """At σ = 1 the implied noise is x_t whatever v is (and the exact Doob correction is 0): the shift is 0,
    not d_eps / 1e-6. Below 1 it changes ε_hat = x_t + (1 − σ)·v by exactly d_eps."""
    from diffalign.sampling import output_shift

    s = scheduler(steps=4)
    x, d_eps = torch.randn(3, 2), torch.randn(3, 2)
    t_one = s.timesteps[0]
    assert float(t_one) == 1000.0
    shift = output_shift(s, d_eps, t_one, x)
    assert torch.isfinite(shift).all() and float(shift.abs().max()) == 0.0
    t = s.timesteps[1:3]
    ts = torch.stack([t[0], t[1], t[1]])
    v = torch.randn(3, 2)
    sig = flow.sigma(s, ts, x)
    eps = lambda v_: x + (1 - sig) * v_  # noqa: E731
    torch.testing.assert_close(eps(v + output_shift(s, d_eps, ts, x)) - eps(v), d_eps)
