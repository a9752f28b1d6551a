"""A method with a second trainable module and tensor state, for the core's tests (used as
`method: extra_module_method:ValueBaseline` with tests/ on the Python path).

Policy gradient with a learned value baseline (DPOK's V, simplified): V(x0) is a small MLP
regressed onto the reward with its own learning rate; the policy's advantage is r - V(x0).
A running mean of the reward is kept as a tensor in the method state."""

from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from diffalign.losses import ppo_clip_loss
from diffalign.methods import Micro, Trainable
from diffalign.seeding import seed_for
from diffalign.trajectory import Trajectory


@dataclass
class Batch:
    traj: Trajectory
    rewards: torch.Tensor  # (N,)
    keys: torch.Tensor  # (N,) global sample indices
    epoch: int


class ValueBaseline:
    name = "value-baseline"
    description = "test method: PPO with a learned value baseline V(x0) (a second module) and tensor state"
    requires_logprob = True
    defaults = {"sampling.logprob": "mean"}

    @dataclass
    class Config:
        value_lr: float = 1e-2  # learning rate of the value network
        clip_range: float = 0.2  # PPO clip
        minibatches: int = 2  # optimizer steps per epoch

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler
        torch.manual_seed(seed_for(run.cfg.seed, "value-init"))
        self.value = nn.Sequential(nn.Linear(prod(run.model.sample_shape), 32), nn.SiLU(), nn.Linear(32, 1))
        self.reward_mean = torch.zeros(())  # tensor state

    def modules(self):
        return {"denoiser": Trainable(self.run.model.denoiser),
                "value": Trainable(self.value, lr=self.args.value_lr, weight_decay=0.0)}

    def collect(self, epoch):
        run, trajs, rewards = self.run, [], []
        slots = run.slots(epoch, "vb")
        for slot in slots:
            trajs.append(self.sampler.sample(run.model, slot.local, generator=slot.generators))
            rewards.append(run.score(run.model.decode(trajs[-1].final), slot.local))
        r = torch.cat(rewards)
        self.reward_mean = 0.9 * self.reward_mean + 0.1 * run.gather(r).mean().cpu()
        keys = torch.cat([slot.keys for slot in slots])
        return Batch(Trajectory.cat(trajs), r, keys, epoch), {"reward_mean": float(run.gather(r).mean())}

    def micro_steps(self, batch: Batch):
        g = self.run.generator("vb-perm", batch.epoch)
        for share in self.run.minibatches(batch.keys, self.args.minibatches, g):
            step = int(torch.randint(batch.traj.num_steps, (1,), generator=g))
            yield Micro(self._loss(batch, share, step), share)

    def _loss(self, batch, share, step):
        def compute():
            mb = batch.traj.select(share.rows)
            r = batch.rewards[share.rows.to(batch.rewards.device)]
            v = self.value(mb.final.flatten(1)).squeeze(1)
            lp = self.sampler.rescore(self.run.model, mb, step)
            pg, _ = ppo_clip_loss(lp, mb.log_probs[:, step], (r - v).detach(), self.args.clip_range)
            loss = share.mean(pg) + share.mean((v - r) ** 2)
            return loss, {"loss": loss.detach(), "value_error": ((v - r) ** 2).mean().detach()}

        return compute

    def state_dict(self):
        return {"reward_mean": self.reward_mean}

    def load_state_dict(self, state):
        self.reward_mean = state["reward_mean"]
