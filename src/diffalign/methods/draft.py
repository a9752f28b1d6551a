"""DRaFT (Clark et al. 2024): direct reward fine-tuning, gradient through the last K steps
(METHODS.md §7, reward-backprop baselines).

DRaFT-K: sample with gradients through the last K sampling steps only; loss −reward_scale·r.
DRaFT-LV (`lv_samples: n`, with K = 1): sample without gradient, then re-noise the final
sample x_0 to the last step's timestep n times (x = sqrt(ā) x_0 + sqrt(1 − ā) ε, fresh ε
each) and take the last sampling step from there with gradient; the loss averages the n
rewards, which lowers the variance of the one-step gradient. Each of those n images is a
reward query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import add_noise
from ..seeding import generators
from . import register
from .backprop import BackpropConfig, RewardBackprop, generators_for


@register
class DRaFT(RewardBackprop):
    name = "draft"
    description = "DRaFT: reward gradient through the last K sampling steps (DRaFT-LV: K = 1 from re-noised x_0)"

    @dataclass
    class Config(BackpropConfig):
        grad_steps: int = 1  # K: the last K sampling steps carry gradients
        lv_samples: int = 0  # DRaFT-LV: re-noise x_0 this many times (needs grad_steps 1); 0 = off
        checkpoint: bool = True  # gradient checkpointing of the model calls with gradient

        def validate(self, where):
            if self.grad_steps < 1 or self.lv_samples < 0:
                raise ValueError(f"config keys '{where}.grad_steps' (>= 1) and 'lv_samples' (>= 0) out of range")
            if self.lv_samples and self.grad_steps != 1:
                raise ValueError(f"config key '{where}.lv_samples' (DRaFT-LV) needs '{where}.grad_steps' = 1")

    def __init__(self, run, args: Config):
        super().__init__(run, args)
        self.at_most_steps("grad_steps", args.grad_steps)

    def loss(self, prompts, keys, epoch, inner, j):
        run, s, T = self.run, self.sampler, self.sampler.num_steps
        gens = generators_for(run, self.name, epoch, inner, keys)
        if self.args.lv_samples:
            return self._lv_loss(prompts, keys, epoch, inner, gens)
        traj = s.sample(run.model, prompts, generator=gens, with_logprob=False,
                        grad_steps=range(T - self.args.grad_steps, T), checkpoint=self.args.checkpoint)
        r = run.score(run.model.decode(traj.final), prompts)
        return -self.args.reward_scale * r, {"reward_mean": float(r.detach().mean())}
    def _lv_loss(self, prompts, keys, epoch, inner, gens):
        run, s, m = self.run, self.sampler, self.run.model
        traj = s.sample(m, prompts, generator=gens, with_logprob=False)
        x0, t, cond = traj.final.detach(), traj.timesteps[-1].to(m.device), traj.cond
        rewards = []
        for i in range(self.args.lv_samples):
            g = generators(m.device, run.cfg.seed, "draft-lv", epoch, inner, i, indices=keys.tolist())
            eps = s.noise(m, len(prompts), g)
            x = add_noise(m.scheduler, x0, eps, t)
            step = s.step(m, x, t, cond, generator=g)
            rewards.append(run.score(m.decode(step.prev_sample), prompts))
        r = torch.stack(rewards).mean(0)
        return -self.args.reward_scale * r, {"reward_mean": float(r.detach().mean())}
