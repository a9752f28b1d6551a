"""ReFL (Xu et al. 2023, ImageReward): one differentiable step to x0_hat from a random late
step (METHODS.md §7, reward-backprop baselines).

Each update samples without gradient down to a step drawn uniformly from the last `window`
steps, predicts x0_hat from there with gradient (one model call, at the scheduler's
timestep of that step: the public code passes the loop index instead, ImageReward issues
#32 and #112), and takes the loss reward_scale · relu(target − r(x0_hat)): samples already
above `target` stop pulling. The reference code's target is 2 on ImageReward's scale; for
log-probability rewards (≤ 0) the default 0 makes it −r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .backprop import BackpropConfig, RewardBackprop, generators_for


@register
class ReFL(RewardBackprop):
    name = "refl"
    description = "ReFL: sample to a random late step, one differentiable x0_hat prediction, relu(target - reward)"

    @dataclass
    class Config(BackpropConfig):
        window: int = 5  # the gradient step is drawn from the last `window` sampling steps
        target: float = 0.0  # loss = reward_scale * relu(target - r)

        def validate(self, where):
            if self.window < 1:
                raise ValueError(f"config key '{where}.window' must be >= 1")

    def __init__(self, run, args: Config):
        super().__init__(run, args)
        self.at_most_steps("window", args.window)

    def loss(self, prompts, keys, epoch, inner, j):
        run, s, m = self.run, self.sampler, self.run.model
        T = s.num_steps
        stop = int(torch.randint(T - self.args.window, T, (1,), generator=run.generator("refl-step", epoch, inner, j)))
        gens = generators_for(run, self.name, epoch, inner, keys)
        ts = s.timesteps(m)
        cond = m.encode_prompts(prompts)
        x = s.noise(m, len(prompts), gens)
        with torch.no_grad():
            for t in ts[:stop]:
                x = s.step(m, x, t, cond, generator=gens, with_logprob=False).prev_sample
        x0 = s.x0_hat(m, x, ts[stop], cond)  # with gradient, at the scheduler's timestep
        r = run.score(m.decode(x0), prompts)
        per = self.args.reward_scale * torch.relu(self.args.target - r)
        return per, {"reward_mean": float(r.detach().mean()), "stop_step": float(stop)}
