"""Adjoint Matching (`adjoint-matching`; Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching:
Fine-tuning Flow and Diffusion Generative Models with Memoryless Stochastic Optimal Control", arXiv
2409.08861, ICLR 2025; METHODS-after-grpo.md §3). The loss and the lean adjoint: `losses/adjoint.py`.

Collect: rollouts of the current model (no gradients) through the memoryless SDE — on flow models the
flow SDE at noise level √2 (Flow-GRPO's schedule a·sqrt(σ/(1 − σ)) with a = √2 is the memoryless σ(t)
= sqrt(2(1 − t)/t)), on DDIM models eta 1 (the DDPM posterior, the paper's DDPM variant) — with a
deterministic last step (the noiseless final step the reward is taken at). The reward's gradient at
the sample gives ã_K = −∇r/β, and the lean adjoint runs back through the frozen base's step means
(one vector–Jacobian product per step; LoRA off is the base).

Update: per trained step the regression ‖(m_θ − m_base)/s + s·ã_{k+1}‖² on the stored states; its
optimum is p_base·exp(r/β) (`args.beta`, the KL weight: λ = 1/β), exactly under the memoryless schedule.
`args.noise` sets another noise level (the paper shows the target is then biased: for ablations).

Trained steps: every stochastic step, or `train_steps` of them of which the `last_steps` last ones
always (the paper: 10 random and the last 10 of 40). The aligned model is sampled by the same
memoryless sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..flow import is_flow
from ..losses.adjoint import adjoint_matching_loss, lean_adjoint
from ..trajectory import Trajectory
from . import Method, Micro, register


@dataclass
class Paths:
    """One epoch's memoryless trajectories on this process and their lean adjoints."""

    traj: Trajectory
    adjoint: torch.Tensor  # (N, K + 1, *shape)
    keys: torch.Tensor  # (N,) global sample ids
    epoch: int


@register
class AdjointMatching(Method):
    name = "adjoint-matching"
    description = ("Adjoint Matching: regression onto the lean adjoint under the memoryless SDE, optimum "
                   "p_base·exp(r/β) (Domingo-Enrich et al. 2025)")
    requires_reference = True
    requires_differentiable_reward = True

    @dataclass
    class Config:
        beta: float = 1.0  # KL weight: the target is p_base·exp(r / beta)
        noise: float | None = None  # rollout noise level; None = memoryless (flow: √2, DDIM: eta 1)
        train_steps: int = 0  # stochastic steps trained per trajectory (0 = all)
        last_steps: int = 0  # of these, the last ones always trained (the paper: 10 of 20)
        loss_clip: float = 0.0  # cap on each sample's squared residual per step (0 = off)
        minibatches: int = 1  # optimizer steps per pass over the epoch's paths
        inner_epochs: int = 1  # passes over each epoch's paths and adjoints (no new reward queries)

        def validate(self, where):
            checks = [(self.beta > 0, "beta", "must be > 0"),
                      (self.noise is None or self.noise > 0, "noise", "must be > 0 (or null: memoryless)"),
                      (self.train_steps >= 0 and 0 <= self.last_steps, "train_steps", "and last_steps must be >= 0"),
                      (self.last_steps <= self.train_steps or self.train_steps == 0, "last_steps",
                       "must be <= train_steps"),
                      (self.loss_clip >= 0, "loss_clip", "must be >= 0"),
                      (self.minibatches >= 1, "minibatches", "must be >= 1"),
                      (self.inner_epochs >= 1, "inner_epochs", "must be >= 1")]
            for ok, key, message in checks:
                if not ok:
                    raise ValueError(f"config key '{where}.{key}' {message}")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        K = run.cfg.sampling.num_steps
        if K < 2:
            raise ConfigError("adjoint-matching needs sampling.num_steps >= 2 (the last step is deterministic)")
        if args.train_steps > K - 1:
            raise ConfigError(f"args.train_steps = {args.train_steps} exceeds the {K - 1} stochastic steps "
                              f"(sampling.num_steps - 1)")
        memoryless = math.sqrt(2.0) if is_flow(run.model.scheduler) else 1.0
        self.eta = memoryless if args.noise is None else args.noise
        self.sampler = run.sampler.replace(eta=self.eta, sde="flow-grpo", sde_steps=tuple(range(K - 1)), solver=None)

    def _step(self, k: int, x, traj: Trajectory, cond, prev):
        """Step k of the memoryless sampler at x (the last one deterministic)."""
        eta = self.eta if k < traj.num_steps - 1 else 0.0
        return self.sampler.step(self.run.model, x, traj.timesteps[k], cond, prev_sample=prev, with_logprob=False,
                                 eta=eta)

    # ---- collect -----------------------------------------------------------------------------
    def collect(self, epoch: int):
        run = self.run
        trajs, adjoints, rewards = [], [], []
        slots = run.slots(epoch, "adjoint")
        for slot in slots:
            traj = self.sampler.sample(run.model, slot.local, generator=slot.generators, with_logprob=False)
            x = traj.final.detach().requires_grad_(True)
            with torch.enable_grad():
                r = run.score(run.model.decode(x), slot.local)
                grad = torch.autograd.grad(r.sum(), x)[0]
            with run.reference():
                adj = lean_adjoint(lambda k, x_: self._step(k, x_, traj, traj.cond, traj.latents[:, k + 1]).mean,
                                   traj.latents, -grad / self.args.beta)
            trajs.append(traj)
            adjoints.append(adj)
            rewards.append(r.detach())
        global_r = run.dist.gather_batches(rewards)
        batch = Paths(Trajectory.cat(trajs), torch.cat(adjoints), torch.cat([s.keys for s in slots]), epoch)
        norm = batch.adjoint[:, 0].flatten(1).norm(dim=1).mean().view(1).cpu()
        return batch, {"reward_mean": float(global_r.mean()), "reward_std": float(global_r.std()),
                       "adjoint_norm_start": float(run.dist.mean(norm))}

    # ---- update ------------------------------------------------------------------------------
    def trained_steps(self, epoch: int) -> list[int]:
        """The stochastic steps trained this epoch (the same for every sample)."""
        a, stochastic = self.args, list(range(self.sampler.num_steps - 1))
        if a.train_steps == 0:
            return stochastic
        last = stochastic[len(stochastic) - a.last_steps:] if a.last_steps else []
        rest = stochastic[: len(stochastic) - len(last)]
        pick = torch.randperm(len(rest), generator=self.run.generator("adjoint-steps", epoch))[:a.train_steps - len(last)]
        return sorted([rest[i] for i in pick.tolist()] + last)

    def micro_steps(self, batch: Paths):
        steps = self.trained_steps(batch.epoch)
        g = self.run.generator("adjoint-perm", batch.epoch)
        for _ in range(self.args.inner_epochs):
            for share in self.run.minibatches(batch.keys, self.args.minibatches, g):
                for k in steps:
                    yield Micro(self._loss(batch, share, k), share, accumulate=len(steps))

    def _loss(self, batch: Paths, share, k: int):
        def compute():
            run, traj = self.run, batch.traj
            rows = share.rows.to(traj.latents.device)
            x, prev = traj.latents[rows, k], traj.latents[rows, k + 1]
            cond = None if traj.cond is None else traj.cond[rows]
            out = self._step(k, x, traj, cond, prev)
            with torch.no_grad(), run.reference():
                base = self._step(k, x, traj, cond, prev)
            per, info = adjoint_matching_loss(out.mean, base.mean, out.std, batch.adjoint[rows, k + 1],
                                              self.args.loss_clip)
            loss = share.mean(per)
            return loss, {"loss": loss.detach(), **info}

        return compute
