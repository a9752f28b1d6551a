"""The Sampler: the one sampling loop, its hooks (score correction, step replacement), branching,
prediction types, and the trajectories it records."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.sampler import Sampler
from diffalign.sampling import (StepOutput, alpha_bar, gaussian_log_prob, step_with_logprob, training_target,
                                x0_from_output)
from diffalign.trajectory import Trajectory
from tiny_models import tiny_model

PLAIN = Sampler(num_steps=10, eta=1.0, guidance_scale=2.0)


def test_plain_trajectory_records_and_rescores_to_ratio_one(tiny):
    traj = PLAIN.sample(tiny, ["0", "1", "2", "1"], generator=torch.Generator().manual_seed(0))
    T = PLAIN.num_steps
    assert traj.latents.shape == (4, T + 1, 1, 4, 4)
    assert traj.log_probs.shape == (4, T) and torch.isfinite(traj.log_probs).all()
    assert not traj.latents.requires_grad and not traj.log_probs.requires_grad
    for i in range(T):
        lp = PLAIN.rescore(tiny, traj, i)
        assert torch.equal(torch.exp(lp - traj.log_probs[:, i]), torch.ones(4))
    # per-row steps (DDPO's per-sample timesteps) score the same transitions
    steps = torch.tensor([0, 3, 9, 3])
    torch.testing.assert_close(PLAIN.rescore(tiny, traj, steps), traj.log_probs[torch.arange(4), steps])
    # the stored output and x0_hat are consistent with the stored step
    i = 3
    x0 = x0_from_output(tiny.scheduler, traj.outputs[:, i], traj.timesteps[i], traj.x_t(i))
    torch.testing.assert_close(x0, traj.x0_preds[:, i])


def test_trajectory_select_takes_rows_as_list_tensor_or_slice(tiny):
    traj = PLAIN.sample(tiny, ["0", "1", "2"], generator=torch.Generator().manual_seed(0))
    for rows in ([2, 0], torch.tensor([2, 0]), slice(1, 3)):
        sub = traj.select(rows)
        want = [2, 0] if not isinstance(rows, slice) else [1, 2]
        assert sub.prompts == [traj.prompts[i] for i in want]
        assert torch.equal(sub.latents, traj.latents[want]) and torch.equal(sub.cond, traj.cond[want])
    both = Trajectory.cat([traj.select([0]), traj.select([1, 2])])
    assert torch.equal(both.latents, traj.latents) and both.prompts == traj.prompts


def test_sampler_is_reproducible_and_guidance_matters(tiny):
    a = PLAIN.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(5))
    b = PLAIN.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(5))
    c = PLAIN.replace(guidance_scale=1.0).sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.outputs, c.outputs)


def test_from_config_resolves_the_model_default_guidance(tiny):
    """An unset guidance scale is the model's (2.0 here), resolved once: never None downstream."""
    from diffalign.config import SamplingConfig

    s = Sampler.from_config(SamplingConfig(num_steps=4, guidance_scale=None), tiny)
    assert s.guidance_scale == 2.0 and s.num_steps == 4
    assert Sampler.from_config(SamplingConfig(guidance_scale=1.5), tiny).guidance_scale == 1.5


def test_matches_diffusers_loop_with_same_generator(tiny):
    """Our loop draws noise as diffusers does: identical samples for the same seed."""
    prompts = ["0", "2"]
    traj = PLAIN.replace(guidance_scale=1.0).sample(tiny, prompts, generator=torch.Generator().manual_seed(11))
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator().manual_seed(11)
    s = tiny.scheduler
    s.set_timesteps(PLAIN.num_steps)
    x = randn_tensor((2, 1, 4, 4), generator=g)
    c = tiny.encode_prompts(prompts)
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(tiny.predict_noise(x, t, c), t, x, eta=1.0, generator=g).prev_sample
    torch.testing.assert_close(traj.final, x, atol=1e-5, rtol=1e-5)


def test_differentiable_mode_grads_only_through_chosen_steps(tiny):
    params = list(tiny.denoiser.parameters())
    traj = PLAIN.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0), grad_steps=[8, 9])
    assert traj.final.requires_grad
    grads = torch.autograd.grad(traj.final.square().sum(), params)
    assert any(g.abs().sum() > 0 for g in grads)
    # the same with checkpointing off gives the same gradients
    traj2 = PLAIN.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0), grad_steps=[8, 9],
                         checkpoint=False)
    grads2 = torch.autograd.grad(traj2.final.square().sum(), params)
    for g1, g2 in zip(grads, grads2):
        torch.testing.assert_close(g1, g2)
    # no grad steps -> nothing to differentiate
    plain = PLAIN.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0))
    assert not plain.final.requires_grad
    torch.testing.assert_close(plain.final, traj.final.detach())


def test_children_share_x_t_and_have_their_own_noise(tiny):
    ts = PLAIN.timesteps(tiny)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = tiny.encode_prompts(["0", "1", "2"])
    ch = PLAIN.children(tiny, x, ts[2], cond, 3, torch.Generator().manual_seed(0))
    assert ch.samples.shape == (3, 3, 1, 4, 4) and ch.log_probs.shape == (3, 3)
    assert not torch.allclose(ch.samples[:, 0], ch.samples[:, 1])  # distinct noise per child
    one = PLAIN.step(tiny, x, ts[2], cond, prev_sample=x)
    torch.testing.assert_close(ch.mean, one.mean)  # one shared mean: the step's
    for j in range(3):  # each child's log-prob is its likelihood under that mean/std, and re-scores to it
        torch.testing.assert_close(gaussian_log_prob(ch.samples[:, j], ch.mean, ch.std), ch.log_probs[:, j])
        torch.testing.assert_close(PLAIN.logprob(tiny, x, ts[2], cond, ch.samples[:, j]), ch.log_probs[:, j])
    with pytest.raises(ValueError, match="k"):
        PLAIN.children(tiny, x, ts[2], cond, 0)


# ---- hooks ------------------------------------------------------------------------------
def _ddim_coefficient(s, t, eta=1.0):
    """d mean / d eps of one DDIM step at fixed x_t (and the step's std)."""
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    ac = s.alphas_cumprod.double()
    a_t, a_p = float(ac[t]), float(ac[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
    var = eta ** 2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    return -math.sqrt(a_p) * math.sqrt(1 - a_t) / math.sqrt(a_t) + math.sqrt(1 - a_p - var), a_t


def test_score_correction_shifts_the_mean_by_hand_worked_amount(tiny):
    """A constant score term c moves eps by -sqrt(1 - a_t) c, so every element of the mean by
    coef * (-sqrt(1 - a_t) c); re-scoring under the corrected sampler still gives ratio 1."""
    c = 0.7
    corrected = PLAIN.replace(guidance_scale=1.0, correction=lambda model, x, t, cond: torch.full_like(x, c))
    plain = PLAIN.replace(guidance_scale=1.0)
    ts = plain.timesteps(tiny)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    cond = tiny.encode_prompts(["0", "1"])
    for t in (ts[0], ts[5], ts[9]):
        a = plain.step(tiny, x, t, cond, prev_sample=x).mean
        b = corrected.step(tiny, x, t, cond, prev_sample=x).mean
        coef, a_t = _ddim_coefficient(tiny.scheduler, int(t))
        torch.testing.assert_close(b - a, torch.full_like(a, coef * -math.sqrt(1 - a_t) * c), atol=1e-5, rtol=1e-4)
    traj = corrected.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0))
    for i in range(traj.num_steps):
        torch.testing.assert_close(corrected.rescore(tiny, traj, i), traj.log_probs[:, i])
    zero = plain.replace(correction=lambda model, x, t, cond: torch.zeros_like(x))
    assert torch.equal(zero.sample(tiny, ["0"], generator=torch.Generator().manual_seed(0)).final,
                       plain.sample(tiny, ["0"], generator=torch.Generator().manual_seed(0)).final)


class AsV(torch.nn.Module):
    """The tiny ε-model re-expressed as a v-prediction model: v = eps/sqrt(a) - sqrt(1-a) x/sqrt(a)."""

    def __init__(self, eps_net, scheduler):
        super().__init__()
        self.eps_net, self.ac = eps_net, scheduler.alphas_cumprod

    def forward(self, x, t, c):
        a = self.ac[t].view(-1, 1, 1, 1)
        return self.eps_net(x, t, c) / a.sqrt() - (1 - a).sqrt() * x / a.sqrt()


def test_v_prediction_model_samples_and_corrects_like_its_eps_twin():
    eps_model = tiny_model()
    v_model = tiny_model(prediction_type="v_prediction")
    v_model.denoiser = AsV(eps_model.denoiser, v_model.scheduler)
    corr = lambda model, x, t, cond: torch.sin(x)  # noqa: E731  (depends on x: not a constant shift)
    for s in (PLAIN, PLAIN.replace(correction=corr)):
        a = s.sample(eps_model, ["0", "1"], generator=torch.Generator().manual_seed(3))
        b = s.sample(v_model, ["0", "1"], generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-3, rtol=1e-4)
        i, ts = 4, a.timesteps
        torch.testing.assert_close(s.x0_hat(eps_model, a.x_t(i), ts[i], a.cond), s.x0_hat(v_model, a.x_t(i), ts[i], a.cond),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_hat_and_training_target_follow_prediction_type(kind):
    """The ideal output for each prediction type (the training target) gives back x0 exactly."""
    s = DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([10, 500, 900])
    x_t = s.add_noise(x0, noise, t)
    target = training_target(s, x0, noise, t)
    a = alpha_bar(s, t, x0)
    want = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}[kind]
    torch.testing.assert_close(target, want)
    torch.testing.assert_close(x0_from_output(s, target, t, x_t), x0, atol=1e-4, rtol=1e-4)


def test_transition_hook_replaces_the_step(tiny):
    """A step replacement (here: the deterministic mean) is what the loop uses at every step."""
    calls = []

    def mean_only(model, output, t, x, *, generator, prev_sample, with_logprob):
        calls.append(int(t))
        out = step_with_logprob(model.scheduler, output, t, x, eta=1.0, prev_sample=x, with_logprob=False)
        return StepOutput(prev_sample=out.mean, log_prob=None, mean=out.mean, std=out.std * 0, x0_pred=out.x0_pred,
                          eps_pred=out.eps_pred)

    s = PLAIN.replace(transition=mean_only)
    a = s.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(0), with_logprob=False)
    b = s.sample(tiny, ["0", "1"], generator=torch.Generator().manual_seed(1), with_logprob=False)
    assert len(calls) == 2 * s.num_steps
    assert not torch.equal(a.latents[:, 0], b.latents[:, 0]) and not torch.equal(a.final, b.final)
    for i in range(s.num_steps):  # each stored step is the mean of the one before
        x_t = a.latents[:, i]
        mean = PLAIN.step(tiny, x_t, a.timesteps[i], a.cond, prev_sample=x_t, with_logprob=False).mean
        torch.testing.assert_close(a.latents[:, i + 1], mean)
