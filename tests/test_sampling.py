"""The log-prob step and the trajectory sampler, held against diffusers and plain math."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffalign import trajectory
from diffalign.sampling import gaussian_log_prob, step_with_logprob, x0_from_eps

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


def test_x0_from_eps_inverts_add_noise():
    s = _ddim()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor(500)
    xt = s.add_noise(x0, noise, t)
    torch.testing.assert_close(x0_from_eps(s, xt, noise, t), x0, atol=1e-4, rtol=1e-4)


def test_plain_trajectory_records_and_rescores_to_ratio_one(tiny):
    g = torch.Generator().manual_seed(0)
    traj = trajectory.sample(tiny, ["0", "1", "2", "1"], generator=g)
    T = tiny.num_inference_steps
    assert traj.latents.shape == (4, T + 1, 1, 4, 4)
    assert traj.log_probs.shape == (4, T) and torch.isfinite(traj.log_probs).all()
    assert not traj.latents.requires_grad and not traj.log_probs.requires_grad
    for i in range(T):
        lp = trajectory.rescore(tiny, traj, i)
        assert torch.equal(torch.exp(lp - traj.log_probs[:, i]), torch.ones(4))
    # eps and x0_hat are consistent with the stored step
    i = 3
    x0 = x0_from_eps(tiny.scheduler, traj.x_t(i), traj.eps[:, i], traj.timesteps[i])
    torch.testing.assert_close(x0, traj.x0_preds[:, i])


def test_sampler_is_reproducible_and_guidance_matters(tiny):
    a = trajectory.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(5))
    b = trajectory.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(5))
    c = trajectory.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(5), guidance_scale=1.0)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.eps, c.eps)


def test_matches_diffusers_loop_with_same_generator(tiny):
    """Our loop draws noise as diffusers does: identical samples for the same seed."""
    prompts = ["0", "2"]
    traj = trajectory.sample(tiny, prompts, generator=torch.Generator().manual_seed(11), guidance_scale=1.0)
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator().manual_seed(11)
    s = tiny.scheduler
    s.set_timesteps(tiny.num_inference_steps)
    x = randn_tensor((2, 1, 4, 4), generator=g)
    c = tiny.encode_prompts(prompts)
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(tiny.predict_noise(x, t, c), t, x, eta=1.0, generator=g).prev_sample
    torch.testing.assert_close(traj.final, x, atol=1e-5, rtol=1e-5)


def test_differentiable_mode_grads_only_through_chosen_steps(tiny):
    params = list(tiny.denoiser.parameters())
    traj = trajectory.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0), grad_steps=[8, 9])
    assert traj.final.requires_grad
    loss = traj.final.square().sum()
    grads = torch.autograd.grad(loss, params)
    assert any(g.abs().sum() > 0 for g in grads)
    # the same with checkpointing off gives the same gradients
    traj2 = trajectory.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0), grad_steps=[8, 9],
                              checkpoint=False)
    grads2 = torch.autograd.grad(traj2.final.square().sum(), params)
    for g1, g2 in zip(grads, grads2):
        torch.testing.assert_close(g1, g2)
    # no grad steps -> nothing to differentiate
    plain = trajectory.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0))
    assert not plain.final.requires_grad
    torch.testing.assert_close(plain.final, traj.final.detach())


def test_branching_children_share_x_t_and_chosen_continues(tiny):
    seen = []

    def choose(br):
        seen.append(br)
        # continue with the child with the largest mean pixel value
        return br.children.flatten(2).mean(-1).argmax(dim=1)

    traj = trajectory.sample(tiny, ["0", "1", "2"], generator=torch.Generator().manual_seed(0),
                             branch_steps=[2, 5], k=3, choose=choose)
    assert [b.step for b in traj.branches] == [2, 5] and len(seen) == 2
    rows = torch.arange(3)
    for br in traj.branches:
        assert br.children.shape == (3, 3, 1, 4, 4)
        assert torch.equal(br.x_t, traj.x_t(br.step))  # every child comes from the stored x_t
        assert not torch.allclose(br.children[:, 0], br.children[:, 1])  # distinct noise per child
        assert torch.equal(traj.x_prev(br.step), br.children[rows, br.chosen])  # the chosen one continued
        assert torch.equal(traj.log_probs[:, br.step], br.log_probs[rows, br.chosen])
        # each child's log-prob is its likelihood under the shared mean/std of x_t
        for j in range(3):
            lp = gaussian_log_prob(br.children[:, j], br.mean, br.std)
            torch.testing.assert_close(lp, br.log_probs[:, j])


def test_branch_choose_must_return_valid_indices(tiny):
    with pytest.raises(ValueError, match="child indices"):
        trajectory.sample(tiny, ["0"], branch_steps=[1], k=2, choose=lambda br: torch.tensor([5]))
    with pytest.raises(ValueError, match="choose"):
        trajectory.sample(tiny, ["0"], branch_steps=[1])
