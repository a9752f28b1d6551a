"""Adjoint Matching (`losses/adjoint.py`, `methods/adjoint.py`): the lean adjoint against autograd through
the base rollout, the memoryless schedule's independence of start and end, the loss by hand, the exact
tilt of a 1-D Gaussian, and the reward moving on the embedded models."""

import math

import pytest
import torch
from torch import nn

from diffalign.config import ConfigError
from diffalign.losses.adjoint import adjoint_matching_loss, lean_adjoint
from diffalign.train import resolve_config, train


def _method(model, reward, **extra):
    from diffalign.context import Run
    from diffalign.methods import build, run_needs

    cfg, args = resolve_config(base={"method": "adjoint-matching", "model": model, "reward": reward,
                                     "prompts": ["1", "7"] if model.startswith("digits") else [""],
                                     "sampling": {"num_steps": 6}, "train": {"batch_size": 4}, **extra})
    run = Run(cfg, **run_needs(cfg.method))
    return run, build(run, args)


def test_loss_hand_worked():
    """mean − mean_base = (1, −2), std 0.5, ã = (2, 0): ρ = (2, −4) + (1, 0) = (3, −4), ‖ρ‖² = 25; clipped at 10."""
    per, info = adjoint_matching_loss(torch.tensor([[1.0, -2.0]]), torch.zeros(1, 2), torch.tensor([[0.5]]),
                                      torch.tensor([[2.0, 0.0]]))
    assert per.tolist() == [25.0] and float(info["residual"]) == 25.0
    per, info = adjoint_matching_loss(torch.tensor([[1.0, -2.0]]), torch.zeros(1, 2), torch.tensor([[0.5]]),
                                      torch.tensor([[2.0, 0.0]]), clip=10.0)
    assert per.tolist() == [10.0] and float(info["clipped_fraction"]) == 1.0
    m = torch.tensor([[0.2]], requires_grad=True)  # the gradient pushes the mean to −std²·ã = −0.5
    adjoint_matching_loss(m, torch.zeros(1, 1), torch.tensor([[0.5]]), torch.tensor([[2.0]]))[0].sum().backward()
    assert float(m.grad) == pytest.approx(2 * (0.2 / 0.5 + 1.0) / 0.5)


def test_lean_adjoint_on_a_linear_chain():
    """Steps x ↦ 2x then x ↦ x + 1: ã_2 = g, ã_1 = g, ã_0 = 2g."""
    steps = [lambda x: 2 * x, lambda x: x + 1]
    latents = torch.tensor([[[1.0], [2.0], [3.0]]])
    adj = lean_adjoint(lambda k, x: steps[k](x), latents, torch.tensor([[0.5]]))
    assert adj.flatten().tolist() == [1.0, 0.5, 0.5]


@pytest.mark.parametrize("model, reward", [("toy2d-flow", "quadratic"), ("toy2d", "quadratic")])
def test_lean_adjoint_is_the_gradient_through_the_base_rollout(model, reward):
    """With the control zero (LoRA just initialised: the model is the base), ã_k is the gradient of −r/β at
    the end with respect to x_k, through the rest of the rollout with its noise held fixed (autograd)."""
    run, method = _method(model, reward, args={"beta": 0.5})
    batch, _ = method.collect(0)
    traj, K = batch.traj, batch.traj.num_steps
    noise = []
    with torch.no_grad():
        for k in range(K):
            out = method._step(k, traj.latents[:, k], traj, traj.cond, traj.latents[:, k + 1])
            noise.append((traj.latents[:, k + 1] - out.mean) / out.std.clamp(min=1e-30) if k < K - 1 else None)
    for start in (0, K // 2):
        x0 = traj.latents[:, start].clone().requires_grad_(True)
        x = x0
        for k in range(start, K):
            out = method._step(k, x, traj, traj.cond, None)
            x = out.mean if k == K - 1 else out.mean + out.std * noise[k]
        torch.testing.assert_close(x.detach(), traj.final, atol=1e-4, rtol=1e-4)  # the same path
        r = run.score(run.model.decode(x), traj.prompts)
        (grad,) = torch.autograd.grad(-r.sum() / 0.5, x0)
        torch.testing.assert_close(batch.adjoint[:, start], grad, atol=1e-5, rtol=1e-3)
        assert grad.abs().max() > 0


@pytest.mark.parametrize("model, steps, bound", [("toy2d-flow", 6, 0.06), ("toy2d", 50, 0.1)])
def test_memoryless_rollouts_forget_their_start(model, steps, bound):
    """Under the memoryless SDE (flow: noise level √2; DDIM: eta 1) the sample is uncorrelated with the
    initial noise; under the ODE it is strongly correlated. The DDPM chain forgets only when it starts
    near ā = 0: toy2d's 'leading' grid starts at t = 831 of 1000 with 6 steps (correlation 0.38 there,
    0.12 at 20 steps, 0.06 at 50)."""
    from diffalign.models import load_model

    m = load_model(model, progress=False)
    _, method = _method(model, "quadratic", sampling={"num_steps": steps})
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4000, *m.sample_shape, generator=g)

    def corr(sampler):
        end = sampler.sample(m, [""] * len(x1), latents=x1, generator=torch.Generator().manual_seed(1),
                             with_logprob=False).final
        return max(abs(float(torch.corrcoef(torch.stack([x1[:, i], end[:, i]]))[0, 1])) for i in range(2))

    assert corr(method.sampler) < 0.06
    assert corr(method.sampler.replace(eta=0.0)) > 0.3


def test_inner_epochs_pass_over_the_same_paths_again():
    """`inner_epochs` repeats the epoch's regression (every minibatch, every trained step) on the same paths,
    with no new rollout or reward query."""
    _, method = _method("toy2d-flow", "quadratic", args={"inner_epochs": 3, "minibatches": 2})
    batch, _ = method.collect(0)
    micros, per_pass = list(method.micro_steps(batch)), 2 * len(method.trained_steps(0))
    assert len(micros) == 3 * per_pass
    for p in range(3):  # every pass covers every path once per trained step
        rows = torch.cat([m.share.rows for m in micros[p * per_pass:(p + 1) * per_pass]])
        assert sorted(rows.tolist()) == sorted(list(range(len(batch.keys))) * len(method.trained_steps(0)))
    loss, _ = micros[-1].compute()
    assert loss.requires_grad and float(loss.detach()) > 0


def test_needs_a_differentiable_reward():
    with pytest.raises(ConfigError, match="needs a differentiable reward.*needs no reward gradient.*grpo"):
        _method("digits", "compressibility")


from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402


class ExactGaussian(ModelMixin, ConfigMixin):
    """The exact flow velocity of 1-D data N(mu, s²) plus a trained residual (zero at the start)."""

    @register_to_config
    def __init__(self, mu: float = 0.5, s: float = 0.6):
        super().__init__()
        self.mu, self.s = mu, s
        self.residual = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x, t):
        sig = (t.float() / 1000).view(-1, 1)
        var = (1 - sig) ** 2 * self.s**2 + sig**2
        centred = x - (1 - sig) * self.mu
        v = sig / var * centred - (self.mu + (1 - sig) * self.s**2 / var * centred)
        return v + self.residual(torch.cat([x, sig], dim=1))


def test_tilts_a_gaussian_exactly(monkeypatch, tmp_path):
    """Base N(0.5, 0.6²) with its exact velocity, reward r = x, β = 1: the optimum p_base·exp(r) is
    N(0.5 + 0.36, 0.6²). Adjoint Matching's samples land on its mean and std."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.models.base import DiffusionModel

    made = []

    def gaussian(*_, **__):
        made.append(DiffusionModel(name="gauss1d", denoiser=ExactGaussian(0.5, 0.6),
                                   scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                                   sample_shape=(1,), encode_prompts=lambda p: None,
                                   forward=lambda net, x, t, c: net(x, t), decode=lambda x: x, prompts=[""]))
        return made[-1]

    monkeypatch.setattr("diffalign.context.load_model", gaussian)
    cfg, args = resolve_config(base={
        "method": "adjoint-matching", "model": "gauss1d", "reward": "custom_reward:make_linear", "prompts": [""],
        "lora": {"enabled": False}, "sampling": {"num_steps": 10}, "seed": 0, "optim": {"lr": 3e-3},
        "train": {"epochs": 60, "batch_size": 256, "batches_per_epoch": 1},
        "eval": {"reward": None, "per_prompt": 2}})
    train(cfg, args, tmp_path / "run")
    from diffalign.sampler import Sampler

    m = made[0]
    sampler = Sampler(num_steps=10, eta=math.sqrt(2), sde_steps=tuple(range(9)))
    with torch.no_grad():
        x = sampler.sample(m, [""] * 8000, generator=torch.Generator().manual_seed(5), with_logprob=False).final
    assert float(x.mean()) == pytest.approx(0.86, abs=0.03)
    assert float(x.std()) == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize("model, reward, gain", [("digits-flow", "ink", 0.03), ("toy2d", "quadratic", 0.2)])
def test_adjoint_matching_raises_the_reward(tmp_path, model, reward, gain):
    """digits-flow with the ink reward (the classifier's log-probability is already near 0 under the
    memoryless sampler) and the DDIM toy2d through DDPM."""
    cfg, args = resolve_config(base={
        "method": "adjoint-matching", "model": model, "reward": reward, "seed": 0, "optim": {"lr": 3e-3},
        "prompts": ["1", "7"] if model.startswith("digits") else [""], "sampling": {"num_steps": 6},
        "eval": {"reward": None, "per_prompt": 8 if model.startswith("digits") else 256},
        "train": {"epochs": 3, "batch_size": 16 if model.startswith("digits") else 64, "batches_per_epoch": 1},
        "args": {"beta": 0.01 if reward == "ink" else 1.0}})
    s = train(cfg, args, tmp_path / "run")
    assert s["final_reward_mean"] > s["base_reward_mean"] + gain, s
