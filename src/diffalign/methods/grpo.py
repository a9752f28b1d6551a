"""GRPO for diffusion and flow models (Flow-GRPO, DanceGRPO, MixGRPO; METHODS.md §10).

Per epoch, each batch draws batch_size / G prompts and samples G trajectories of each (a
group) with per-step log-probs: on a flow model through the SDE of `diffalign.flow`
(`sampling.eta` its level, `sampling.sde` Flow-GRPO's or DanceGRPO's schedule), on a DDIM
model through its own Gaussian step. Then:

- advantages A = (r − mean of the group) / (std + 1e-4) (`losses.group_advantages`; the std
  of the whole batch with `global_std`), clipped to ±adv_clip; a group whose rewards are all
  equal carries no signal and is dropped;
- the loss of a trained step is PPO's clip on its ratio exp(log π_θ − log π_old)
  (`losses.ppo_clip_loss`) plus kl_beta · KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) in closed form
  (`losses.step_kl`: ‖μ_θ − μ_ref‖²/(2σ_t²|dt|), the step's own std);
- MixGRPO (`mix_window` > 0): the SDE runs on a window of that many consecutive steps and
  the ODE (eta 0, no log-prob) everywhere else; only the window's steps are trained. The
  window starts at step 0 and moves `mix_stride` steps every `mix_shift_every` epochs,
  wrapping round to 0 after the last window.

Decisions: the trained steps are one random subset per epoch (`timestep_fraction` of the
SDE steps, as DDPO here); the loss of one optimizer step is the mean over the trained steps
of the minibatch; log-probs default to the per-element mean (`sampling.logprob: mean`, the
scale of the reference code's clip range 1e-4 and KL β); minibatches are global. The
aligned model samples with the plain sampler (the SDE at every step, no window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..losses import group_advantages, ppo_clip_loss, step_kl
from ..trajectory import Trajectory
from . import Method, register
from .policy_gradient import ppo_micro_steps, sample_and_score


@dataclass
class Groups:
    """One epoch's kept samples on this process."""

    traj: Trajectory  # (N local trajectories, groups with signal only)
    advantages: torch.Tensor  # (N,) clipped
    keys: torch.Tensor  # (N,) global sample indices
    steps: torch.Tensor  # (n_train,) step indices trained this epoch
    epoch: int


@register
class GRPO(Method):
    name = "grpo"
    description = ("GRPO (Flow-GRPO/DanceGRPO/MixGRPO): group-normalised advantages, PPO clip on per-step ratios, "
                   "closed-form KL to the reference; flow models through an SDE")
    requires_logprob = True
    requires_reference = True
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-4}

    @dataclass
    class Config:
        group_size: int = 8  # G: samples per prompt; train.batch_size must be a multiple of it
        global_std: bool = False  # normalise advantages by the batch's std instead of each group's
        adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
        clip_range: float = 1e-4  # PPO ratio clip (per-element log-prob scale)
        kl_beta: float = 0.0  # weight of the closed-form KL to the reference per trained step (0 = off)
        inner_epochs: int = 1  # passes over each epoch's samples
        minibatches: int = 1  # optimizer steps per inner epoch (the global samples are split)
        timestep_fraction: float = 1.0  # fraction of the SDE steps trained per epoch
        mix_window: int = 0  # MixGRPO: SDE on this many consecutive steps, ODE elsewhere (0 = SDE everywhere)
        mix_stride: int = 1  # MixGRPO: steps the window moves at each shift
        mix_shift_every: int = 1  # MixGRPO: epochs between shifts
        reward_norm: str = "total"  # weighted-sum rewards: 'total' (Flow-GRPO) or 'per-reward' (each part normalised, then summed)

        def validate(self, where):
            if self.group_size < 2:
                raise ValueError(f"config key '{where}.group_size' must be >= 2 (advantages are relative to a group)")
            if not 0 < self.timestep_fraction <= 1:
                raise ValueError(f"config key '{where}.timestep_fraction' must be in (0, 1]")
            if min(self.minibatches, self.inner_epochs, self.mix_stride, self.mix_shift_every) < 1:
                raise ValueError(f"config keys '{where}.minibatches', 'inner_epochs', 'mix_stride' and "
                                 "'mix_shift_every' must be >= 1")
            if self.reward_norm not in ("total", "per-reward"):
                raise ValueError(f"config key '{where}.reward_norm' must be 'total' or 'per-reward'")
            if self.mix_window < 0 or self.kl_beta < 0:
                raise ValueError(f"config keys '{where}.mix_window' and '{where}.kl_beta' must be >= 0")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler
        n, G, T = run.cfg.train.batch_size, args.group_size, run.cfg.sampling.num_steps
        if n % G:
            raise ConfigError(f"train.batch_size = {n} is not a multiple of args.group_size = {G}: every prompt "
                              "is sampled G times, so choose a batch size divisible by the group size")
        if args.mix_window > T:
            raise ConfigError(f"args.mix_window = {args.mix_window} exceeds sampling.num_steps = {T}")

    def window(self, epoch: int) -> tuple[int, ...] | None:
        """The SDE steps of this epoch (MixGRPO), or None for all."""
        a, T = self.args, self.sampler.num_steps
        if a.mix_window == 0:
            return None
        positions = (T - a.mix_window) // a.mix_stride + 1
        start = (epoch // a.mix_shift_every) % positions * a.mix_stride
        return tuple(range(start, start + a.mix_window))

    def collect(self, epoch: int):
        run, a = self.run, self.args
        n, G = run.cfg.train.batch_size, a.group_size
        window = self.window(epoch)
        scored = sample_and_score(run, self.sampler.replace(sde_steps=window), epoch, "grpo",
                                  draw=lambda b: [p for p in run.draw_prompts(epoch, b, n=n // G) for _ in range(G)])
        global_r = scored.rewards  # the global (batch, group, member) order
        per_reward = a.reward_norm == "per-reward"
        adv, keep = group_advantages(scored.parts if per_reward else global_r, G, a.global_std,
                                     weights=run.meter.part_weights if per_reward else None)
        local = scored.keys
        adv, keep = adv[local], keep[local]
        rows = keep.nonzero().flatten()
        sde = list(range(self.sampler.num_steps)) if window is None else list(window)
        n_train = max(1, int(round(len(sde) * a.timestep_fraction)))
        pick = torch.randperm(len(sde), generator=run.generator("grpo-steps", epoch))[:n_train].sort().values
        batch = Groups(scored.traj.select(rows.to(run.device)),
                       adv[rows].clamp(-a.adv_clip, a.adv_clip).to(run.device), local[rows],
                       torch.tensor(sde)[pick], epoch)
        metrics = {"reward_mean": float(global_r.mean()), "reward_std": float(global_r.std()),
                   "kept_fraction": float(group_advantages(global_r, G)[1].float().mean()),
                   "window_start": -1 if window is None else window[0]}
        return batch, metrics

    def micro_steps(self, batch: Groups):
        every = batch.steps.expand(len(batch.keys), len(batch.steps))  # the same steps for every sample
        return ppo_micro_steps(self.run, "grpo", batch.epoch, self.args, batch.traj, batch.advantages, batch.keys,
                               lambda g: every, self._loss_fn)

    def _loss_fn(self, mb: Trajectory, adv, steps: torch.Tensor, share):
        def compute():
            run, s, step = self.run, self.sampler, int(steps[0])  # one step for the whole minibatch
            x_t, x_prev = mb.latents[:, step], mb.latents[:, step + 1]
            t = mb.timesteps[step]
            out = s.step(run.model, x_t, t, mb.cond, prev_sample=x_prev)
            per, info = ppo_clip_loss(out.log_prob, mb.log_probs[:, step], adv, self.args.clip_range)
            if self.args.kl_beta > 0:
                with torch.no_grad(), run.reference():
                    ref = s.step(run.model, x_t, t, mb.cond, prev_sample=x_prev, with_logprob=False)
                kl = step_kl(out.mean, ref.mean, out.std, s.reduction)
                per = per + self.args.kl_beta * kl
                info["kl"] = kl.mean().detach()
            loss = share.mean(per)
            info["ratio"] = torch.exp(out.log_prob - mb.log_probs[:, step]).mean().detach()
            return loss, {"loss": loss.detach(), **info}

        return compute
