"""DPOK (Fan et al. 2023): policy gradient with a KL regulariser and a learned value baseline
(METHODS.md §1, DPOK paragraph; the structure of google-research/dpok).

Every epoch samples trajectories with the current policy, scores them, and adds each of
their transitions (x_t, x_{t-1}, t, condition, log π_old, the reference model's output at
x_t, the final reward) to a replay buffer of the most recent `buffer_size` trajectories.
Then, on minibatches drawn from the buffer:

- `value_steps` steps of the value network V(x_t, t, c), a second trainable module (the
  model's small field network, its output averaged to a number, zero at the start),
  regressed onto the final reward: (V − r)²;
- `policy_steps` steps of the policy: −reward_weight·(r − V)·clamp(ratio, 1 − ε, 1 + ε)
  with ratio = π_θ/π_old of the stored step (a plain clamp, as DPOK's code, not PPO's
  min), plus kl_weight·||out_θ − out_ref||² per element at x_t (the KL of two Gaussians
  with the same std is proportional to the squared difference of the means, which the
  reference code writes on the guided noise predictions), switched on after `kl_warmup`
  epochs.

The buffer is part of the method's state (tensors, saved with safetensors), so a resumed
run continues with the same buffer. Reward queries: one per sampled trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..config import ConfigError
from ..seeding import seed_for
from ..trajectory import Rows
from . import Method, Micro, Trainable, register


@dataclass
class Buffer(Rows):
    """Transitions of recent trajectories on this process (every tensor has N rows)."""

    x_t: torch.Tensor
    x_prev: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None
    log_prob: torch.Tensor  # log π_old(x_prev | x_t) when sampled
    out_ref: torch.Tensor  # the reference model's (guided) output at x_t
    reward: torch.Tensor  # the trajectory's final reward
    keys: torch.Tensor  # global ids (CPU)


@dataclass
class Round:
    buffer: Buffer
    epoch: int


@register
class DPOK(Method):
    name = "dpok"
    description = "DPOK: policy gradient with a KL penalty to the base and a learned value baseline (Fan et al. 2023)"
    requires_logprob = True
    requires_reference = True
    defaults = {"optim.lr": 1e-4, "optim.grad_clip": 0.1, "sampling.logprob": "mean"}  # ε 1e-4: per-element scale

    @dataclass
    class Config:
        reward_weight: float = 10.0  # scale of the advantage (the paper: 10 for one prompt, 1000 for many)
        kl_weight: float = 0.01  # weight of ||out_θ − out_ref||² (the paper: 0.01 / 0.1)
        kl_warmup: int = 0  # epochs before the KL term is switched on
        clip_range: float = 1e-4  # the ratio is clamped to [1 − ε, 1 + ε]
        buffer_size: int = 64  # trajectories kept in the replay buffer (per process share of the global count)
        policy_steps: int = 5  # policy optimizer steps per epoch
        value_steps: int = 5  # value optimizer steps per epoch
        minibatch: int = 64  # transitions per optimizer step (global)
        value_lr: float = 1e-3  # learning rate of the value network

        def validate(self, where):
            if min(self.buffer_size, self.policy_steps, self.minibatch) < 1 or self.value_steps < 0:
                raise ValueError(f"config keys '{where}.buffer_size', 'policy_steps', 'minibatch' (>= 1) and "
                                 "'value_steps' (>= 0) out of range")

    def __init__(self, run, args: Config):
        self.run, self.args, self.sampler = run, args, run.sampler
        if run.model.make_field_net is None:
            raise ConfigError(f"method '{self.name}' needs a value network, but model '{run.cfg.model}' has no "
                              "make_field_net: add one to the model")
        torch.manual_seed(seed_for(run.cfg.seed, "value-init"))
        self.value_net = run.model.make_field_net().to(run.device)
        self.buffer: Buffer | None = None

    def modules(self):
        return {"denoiser": Trainable(self.run.model.denoiser),
                "value": Trainable(self.value_net, lr=self.args.value_lr, weight_decay=0.0)}

    def value(self, x_t, t, cond) -> torch.Tensor:
        """V(x_t, t, c): the field network's output averaged to one number per sample."""
        return self.run.model.forward(self.value_net, x_t, t, cond).flatten(1).mean(1)

    def collect(self, epoch: int):
        run, s, m = self.run, self.sampler, self.run.model
        n, T = run.cfg.train.batch_size, s.num_steps
        rewards = []
        for slot in run.slots(epoch, "dpok"):
            b, local = slot.index, slot.local
            traj = s.sample(m, local, generator=slot.generators)
            r = run.score(m.decode(traj.final), local)
            rewards.append(r)
            B = len(local)
            x_t, x_prev = traj.latents[:, :-1].flatten(0, 1), traj.latents[:, 1:].flatten(0, 1)
            t = traj.timesteps.to(m.device).repeat(B)
            cond = None if traj.cond is None else traj.cond.repeat_interleave(T, 0)
            with run.reference():
                out_ref = s.predict(m, x_t, t, cond)
            sample_ids = (epoch * run.cfg.train.batches_per_epoch + b) * n + slot.positions
            new = Buffer(x_t, x_prev, t, cond, traj.log_probs.flatten(), out_ref, r.repeat_interleave(T),
                         sample_ids.repeat_interleave(T) * T + torch.arange(T).repeat(B))
            self.buffer = new if self.buffer is None else Buffer.cat([self.buffer, new])
        keep = self.args.buffer_size * T  # the newest transitions
        if len(self.buffer) > keep:
            self.buffer = self.buffer.select(torch.arange(len(self.buffer) - keep, len(self.buffer)))
        g = run.gather(torch.cat(rewards)).cpu()
        return Round(self.buffer, epoch), {"reward_mean": float(g.mean()), "reward_std": float(g.std()),
                                           "buffer": float(len(self.buffer))}

    def micro_steps(self, batch: Round):
        run, a, buf = self.run, self.args, batch.buffer
        total = run.dist.total(len(buf))
        parts = max(1, total // a.minibatch)
        for kind, steps in (("value", a.value_steps), ("policy", a.policy_steps)):
            shares = run.minibatches(buf.keys, parts, run.generator(f"dpok-{kind}", batch.epoch))
            for share in shares[:steps]:
                yield Micro(self._loss(kind, buf.select(share.rows), share, batch.epoch), share)

    def _loss(self, kind, mb: Buffer, share, epoch):
        def compute():
            run, s, a = self.run, self.sampler, self.args
            if kind == "value":
                err = (self.value(mb.x_t, mb.t, mb.cond) - mb.reward) ** 2
                loss = share.mean(err)
                return loss, {"value_loss": loss.detach()}
            with torch.no_grad():
                adv = a.reward_weight * (mb.reward - self.value(mb.x_t, mb.t, mb.cond))
            out = s.predict(run.model, mb.x_t, mb.t, mb.cond)
            lp = s.step(run.model, mb.x_t, mb.t, mb.cond, prev_sample=mb.x_prev, output=out).log_prob
            ratio = torch.exp(lp - mb.log_prob)
            per = -adv * torch.clamp(ratio, 1 - a.clip_range, 1 + a.clip_range)
            kl = (out - mb.out_ref).pow(2).flatten(1).mean(1)
            if epoch >= a.kl_warmup:
                per = per + a.kl_weight * kl
            loss = share.mean(per)
            return loss, {"loss": loss.detach(), "kl": kl.mean().detach(), "ratio": ratio.mean().detach()}

        return compute

    def state_dict(self) -> dict:
        return {} if self.buffer is None else {"buffer": {f.name: getattr(self.buffer, f.name) for f in fields(Buffer)
                                                           if getattr(self.buffer, f.name) is not None}}

    def load_state_dict(self, state: dict) -> None:
        if "buffer" in state:
            b = state["buffer"]
            dev = self.run.device
            self.buffer = Buffer(**{f.name: (b[f.name] if f.name == "keys" else b[f.name].to(dev)) if f.name in b else None
                                    for f in fields(Buffer)})
