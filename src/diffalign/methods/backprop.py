"""Shared pieces of the reward-backprop methods (AlignProp, DRaFT, ReFL; METHODS.md §7 baselines),
as functions: they sample *inside* the update, with gradients through some steps, and
backpropagate a differentiable reward.

`collect` only draws the prompts (and fixes the noise through seeded generators); each
micro-step samples its share of a global minibatch with gradients, scores it through
`run.score` (one reward query per image, counted there), and returns the loss. Reward
queries are therefore spent in the update, once per sample and inner epoch.

A method of the family subclasses `RewardBackprop` (with a `Config` subclassing
`BackpropConfig`) and writes `loss(prompts, keys, epoch, inner, j)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from . import Method, Micro


@dataclass
class BackpropConfig:
    """The `args` every reward-backprop method has."""

    reward_scale: float = 1.0  # the reward's weight in the loss
    minibatches: int = 1  # optimizer steps per inner epoch
    inner_epochs: int = 1  # passes over each epoch's prompts (new noise each pass)


class RewardBackprop(Method):
    """Base of the reward-backprop methods: prompts in `collect`, sampling and scoring inside the
    update; a subclass writes `loss(prompts, keys, epoch, inner, j) -> (per-sample loss, metrics)`."""

    requires_differentiable_reward = True
    defaults = {"optim.lr": 1e-3}

    def __init__(self, run, args):
        self.run, self.args, self.sampler = run, args, run.sampler

    def at_most_steps(self, key: str, value: int) -> None:
        """Refuse a step count above sampling.num_steps, naming the key."""
        if value > self.sampler.num_steps:
            raise ConfigError(f"args.{key} = {value} exceeds sampling.num_steps = {self.sampler.num_steps}")

    def collect(self, epoch: int):
        return draw(self.run, epoch), {}

    def micro_steps(self, batch):
        def loss(prompts, keys, inner, j):
            return self.loss(prompts, keys, batch.epoch, inner, j)

        return micro_steps(self.run, batch, self.args.minibatches, self.args.inner_epochs, self.name, loss)


@dataclass
class PromptBatches:
    """What `collect` hands on: this process's prompts of every batch, and their global ids."""

    prompts: list[list[str]]  # per batch: this process's prompts
    keys: torch.Tensor  # (batches * local batch,) global sample ids, batch-major
    epoch: int


def draw(run, epoch: int) -> PromptBatches:
    slots = run.slots(epoch, "prompts")
    return PromptBatches([slot.local for slot in slots], torch.cat([slot.keys for slot in slots]), epoch)


def generators_for(run, name: str, epoch: int, inner: int, keys: torch.Tensor) -> list[torch.Generator]:
    """Fresh per-sample generators for the global ids `keys`: the same noise whatever the process
    count, new noise every epoch and inner epoch."""
    from ..seeding import generators

    return generators(run.device, run.cfg.seed, name, epoch, inner, indices=keys.tolist())


def micro_steps(run, batch: PromptBatches, minibatches: int, inner_epochs: int, name: str, loss_fn):
    """One optimizer step per global minibatch of samples; `loss_fn(prompts, keys, inner, j)` returns
    (per-sample loss (n,), metrics) for this process's part of minibatch j of inner epoch `inner`
    (anything drawn per update is seeded by (epoch, inner, j): the same on every process)."""
    flat = [p for ps in batch.prompts for p in ps]
    for inner in range(inner_epochs):
        shares = run.minibatches(batch.keys, minibatches, run.generator(f"{name}-perm", batch.epoch, inner))
        for j, share in enumerate(shares):
            yield Micro(_compute(flat, batch.keys, share, (inner, j), loss_fn), share)


def _compute(flat_prompts, keys, share, where, loss_fn):
    def compute():
        per, metrics = loss_fn([flat_prompts[i] for i in share.rows.tolist()], keys[share.rows], *where)
        loss = share.mean(per)
        return loss, {"loss": loss.detach(), **metrics}

    return compute
