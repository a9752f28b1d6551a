"""DDPO (Black et al. 2023): policy-gradient RL on the denoising chain (METHODS.md §1).

Per stored step: ratio = exp(log π_θ - log π_old), loss
mean(max(-A·ratio, -A·clip(ratio, 1 - ε, 1 + ε))) (`losses.ppo_clip_loss`), advantages
from per-prompt reward normalisation (buffer 32, min count 16), clipped to
[-adv_clip, adv_clip].

Decisions: the reference code averages log-probs over elements, and its tiny clip range
(1e-4) assumes that scale, so this method defaults to `sampling.logprob: mean`. The
loss of one optimizer step is the mean over the trained timesteps of the minibatch (the
reference code's accumulation over timesteps). The trained steps are one random subset
for the whole epoch's samples, or (`per_sample_timesteps: true`, as the reference code)
one subset per sample; with `timestep_fraction: 1` the two differ only in float order.
Minibatches are global (`Run.minibatches`): any number of processes gives the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import ppo_clip_loss
from ..stats import PerPromptStatTracker
from ..trajectory import Trajectory
from . import Method, register
from .policy_gradient import ppo_micro_steps, sample_and_score


@dataclass
class Rollouts:
    """One epoch's samples on this process."""

    traj: Trajectory  # (N local trajectories)
    advantages: torch.Tensor  # (N,) clipped advantages
    keys: torch.Tensor  # (N,) global sample indices (batch-major, then process, then local index)
    epoch: int


@register
class DDPO(Method):
    name = "ddpo"
    description = "DDPO: PPO-clipped policy gradient on every denoising step, per-prompt advantages (Black et al. 2023)"
    requires_logprob = True
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-4}

    @dataclass
    class Config:
        clip_range: float = 1e-4  # PPO ratio clip (deliberately tiny; per-element log-prob scale)
        adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
        inner_epochs: int = 1  # passes over each epoch's samples
        minibatches: int = 1  # optimizer steps per inner epoch (the global samples are split)
        timestep_fraction: float = 1.0  # fraction of denoising steps trained per trajectory
        per_sample_timesteps: bool = False  # one random subset of steps per sample (reference code) vs per epoch
        per_prompt_stats: bool = True  # normalise rewards per prompt (else whole batch)
        stat_buffer: int = 32  # rewards kept per prompt
        stat_min_count: int = 16  # below this, batch statistics are used

        def validate(self, where):
            if not 0 < self.timestep_fraction <= 1:
                raise ValueError(f"config key '{where}.timestep_fraction' must be in (0, 1]")
            if self.minibatches < 1 or self.inner_epochs < 1:
                raise ValueError(f"config keys '{where}.minibatches' and '{where}.inner_epochs' must be >= 1")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler
        self.tracker = PerPromptStatTracker(args.stat_buffer, args.stat_min_count)

    def collect(self, epoch: int):
        run, a = self.run, self.args
        scored = sample_and_score(run, self.sampler, epoch, "sample")
        global_r = scored.rewards  # batch-major: indexed by the keys
        if a.per_prompt_stats:
            adv = torch.as_tensor(self.tracker.update(scored.prompts, global_r.numpy()), dtype=torch.float32)
        else:
            adv = (global_r - global_r.mean()) / (global_r.std() + 1e-6)
        adv = adv[scored.keys].to(run.device)
        batch = Rollouts(scored.traj, adv.clamp(-a.adv_clip, a.adv_clip), scored.keys, epoch)
        metrics = {"reward_mean": float(global_r.mean()), "reward_std": float(global_r.std()),
                   "local_reward_mean": float(scored.local_rewards.mean())}
        return batch, metrics

    def micro_steps(self, batch: Rollouts):
        T = batch.traj.num_steps
        n_train = max(1, int(round(T * self.args.timestep_fraction)))

        def steps(g):
            if self.args.per_sample_timesteps:  # drawn for every global sample, in key order
                n_all = self.run.cfg.train.batch_size * self.run.cfg.train.batches_per_epoch
                return torch.stack([torch.randperm(T, generator=g)[:n_train] for _ in range(n_all)])[batch.keys]
            return torch.randperm(T, generator=g)[:n_train].sort().values.expand(len(batch.keys), n_train)

        return ppo_micro_steps(self.run, "ddpo", batch.epoch, self.args, batch.traj, batch.advantages, batch.keys,
                               steps, self._loss_fn)

    def _loss_fn(self, mb: Trajectory, adv, steps, share):
        def compute():
            lp = self.sampler.rescore(self.run.model, mb, steps)
            old = mb.log_probs.gather(1, steps.to(mb.log_probs.device).view(-1, 1)).squeeze(1)
            per, info = ppo_clip_loss(lp, old, adv, self.args.clip_range)
            loss = share.mean(per)
            return loss, {"loss": loss.detach(), **info}

        return compute

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
