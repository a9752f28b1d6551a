"""AlignProp (Prabhudesai et al. 2023): backpropagate a differentiable reward through the
sampling chain, truncated at a random cutoff (METHODS.md §7, reward-backprop baselines).

Each update samples its minibatch with gradients through the last K steps only (the steps
before the cutoff run without gradient, which cuts the chain there); K is drawn per update
uniformly from [min_grad_steps, max_grad_steps] (the reference code draws the cutoff from
N(42, 5) of 50 steps, i.e. K ≈ 8 ± 5; `max_grad_steps: 0` means every step). Every model
call with gradient is checkpointed (`torch.utils.checkpoint`, non-reentrant) unless
`checkpoint: false`, so memory does not grow with K. Loss: −reward_scale · r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from . import register
from .backprop import BackpropConfig, RewardBackprop, generators_for


@register
class AlignProp(RewardBackprop):
    name = "alignprop"
    description = "AlignProp: reward backpropagated through the sampling chain from a random cutoff, checkpointed"

    @dataclass
    class Config(BackpropConfig):
        min_grad_steps: int = 1  # K, the steps with gradient, is drawn per update from [min, max]
        max_grad_steps: int = 0  # 0 = every step
        checkpoint: bool = True  # gradient checkpointing of every model call with gradient

        def validate(self, where):
            if self.min_grad_steps < 1 or self.max_grad_steps < 0:
                raise ValueError(f"config keys '{where}.min_grad_steps' (>= 1) and 'max_grad_steps' (>= 0) out of range")

    def __init__(self, run, args: Config):
        super().__init__(run, args)
        self.k_range = (args.min_grad_steps, args.max_grad_steps or self.sampler.num_steps)
        self.at_most_steps("max_grad_steps", self.k_range[1])
        if self.k_range[0] > self.k_range[1]:
            raise ConfigError(f"args.min_grad_steps = {self.k_range[0]} exceeds args.max_grad_steps = {self.k_range[1]}")

    def loss(self, prompts, keys, epoch, inner, j):
        run, s = self.run, self.sampler
        g = run.generator("alignprop-k", epoch, inner, j)
        k = int(torch.randint(self.k_range[0], self.k_range[1] + 1, (1,), generator=g))
        traj = s.sample(run.model, prompts, generator=generators_for(run, self.name, epoch, inner, keys),
                        with_logprob=False, grad_steps=range(s.num_steps - k, s.num_steps),
                        checkpoint=self.args.checkpoint)
        r = run.score(run.model.decode(traj.final), prompts)
        return -self.args.reward_scale * r, {"reward_mean": float(r.detach().mean()), "grad_steps": float(k)}
