"""The policy-gradient pipeline DDPO and GRPO share; each brings its own advantage estimator.

Collect: every rollout batch of the epoch is sampled with step log-probs and scored
(`sample_and_score`). Update (`ppo_micro_steps`): per inner epoch, global minibatches of the
samples; per minibatch, one micro-batch per trained step, whose gradients together make one
optimizer step (their mean: the loop divides by the number of trained steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..trajectory import Trajectory
from . import Micro


@dataclass
class Scored:
    """An epoch's samples on this process, and every process's rewards."""

    traj: Trajectory  # this process's samples, batch-major
    keys: torch.Tensor  # (N,) their global ids: their rows of `rewards`
    local_rewards: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (batches · batch_size,) every process's rewards, batch-major (CPU)
    prompts: list[str]  # the global prompts, batch-major
    parts: torch.Tensor  # (batches · batch_size, k) every process's rewards by part of a weighted sum (k = 1: the reward)


def sample_and_score(run, sampler, epoch: int, purpose: str, draw=None, with_logprob: bool = True) -> Scored:
    """Sample and score every rollout batch of the epoch (`run.slots(epoch, purpose, draw)`);
    `with_logprob=False` for deterministic samplers (eta 0: the steps have no likelihood)."""
    slots = run.slots(epoch, purpose, draw)
    trajs, rewards, parts = [], [], []
    for slot in slots:
        traj = sampler.sample(run.model, slot.local, generator=slot.generators, with_logprob=with_logprob)
        trajs.append(traj)
        r, p = run.meter.score_parts(run.model.decode(traj.final), slot.local)
        rewards.append(r)
        parts.append(p)
    return Scored(Trajectory.cat(trajs), torch.cat([slot.keys for slot in slots]), torch.cat(rewards),
                  run.dist.gather_batches(rewards), [p for slot in slots for p in slot.prompts],
                  run.dist.gather_batches(parts))


def ppo_micro_steps(run, name: str, epoch: int, args, traj: Trajectory, advantages, keys, steps, loss_fn):
    """The micro-batches of one epoch's update. `steps(g)` gives the trained steps, (N, n_train) per
    sample, and may draw from `g`, the inner epoch's generator, after the minibatches have;
    `loss_fn(minibatch, advantages, steps (n,), share)` returns the micro-batch's `compute`."""
    for inner in range(args.inner_epochs):
        g = run.generator(f"{name}-perm", epoch, inner)
        shares = run.minibatches(keys, args.minibatches, g)
        trained = steps(g)
        n_train = trained.shape[1]
        for share in shares:
            mb = traj.select(share.rows)
            adv = advantages[share.rows.to(advantages.device)]
            for j in range(n_train):
                yield Micro(loss_fn(mb, adv, trained[share.rows, j], share), share, accumulate=n_train)
