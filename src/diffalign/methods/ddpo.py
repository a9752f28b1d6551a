"""DDPO (Black et al. 2023): policy-gradient RL on the denoising chain (METHODS.md §1).

Per stored step: ratio = exp(log pi_theta - log pi_old), loss
mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), advantages from per-prompt
reward normalisation (buffer 32, min count 16), clipped to [-adv_clip, adv_clip].

Decisions: the reference code averages log-probs over elements, and its tiny clip
range (1e-4) assumes that scale, so this method defaults to `sampling.logprob:
mean`. The loss of one optimizer step is the mean over the trained timesteps of
the minibatch (the reference code's accumulation over timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import trajectory
from ..stats import PerPromptStatTracker
from ..seeding import seed_for
from . import Micro, register


def ddpo_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """Clipped surrogate loss and diagnostics for one timestep of a batch."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    info = {
        "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2).detach(),
        "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()).detach(),
    }
    return loss, info


@register
class DDPO:
    name = "ddpo"
    description = "DDPO: PPO-clipped policy gradient on every denoising step, per-prompt advantages (Black et al. 2023)"
    requires_logprob = True
    requires_reference = False
    requires_differentiable_reward = False
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-4}

    @dataclass
    class Config:
        clip_range: float = 1e-4  # PPO ratio clip (deliberately tiny; per-element log-prob scale)
        adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
        inner_epochs: int = 1  # passes over each epoch's samples
        minibatches: int = 1  # optimizer steps per inner epoch (the local batch is split)
        timestep_fraction: float = 1.0  # fraction of denoising steps trained per trajectory
        per_prompt_stats: bool = True  # normalise rewards per prompt (else whole batch)
        stat_buffer: int = 32  # rewards kept per prompt
        stat_min_count: int = 16  # below this, batch statistics are used

        def validate(self, where):
            if not 0 < self.timestep_fraction <= 1:
                raise ValueError(f"config key '{where}.timestep_fraction' must be in (0, 1]")
            if self.minibatches < 1 or self.inner_epochs < 1:
                raise ValueError(f"config keys '{where}.minibatches' and '{where}.inner_epochs' must be >= 1")

    def __init__(self, trainer, args: Config):
        self.t, self.args = trainer, args
        self.tracker = PerPromptStatTracker(args.stat_buffer, args.stat_min_count)
        if trainer.local_batch * trainer.cfg.train.batches_per_epoch % args.minibatches:
            raise ValueError("args.minibatches must divide the per-process samples per epoch")

    def collect(self, epoch: int):
        t, cfg = self.t, self.t.cfg
        trajs, rewards, prompts_all = [], [], []
        n = cfg.train.batch_size
        for b in range(cfg.train.batches_per_epoch):
            prompts = t.draw_prompts(epoch, b, n=n)
            local = prompts[t.local_slice(n)]
            traj = trajectory.sample(
                t.model, local, num_steps=cfg.sampling.num_steps, eta=cfg.sampling.eta,
                guidance_scale=cfg.sampling.guidance_scale, reduction=cfg.sampling.logprob,
                generator=t.sample_generators("sample", epoch, b, n_global=n),
            )
            trajs.append(traj)
            rewards.append(t.score(t.model.decode(traj.final), local))
            prompts_all += prompts
        traj = trajectory.Trajectory.cat(trajs)
        local_r = torch.cat(rewards)
        # gather concatenates by process, and process r holds samples [r*B, (r+1)*B) of each
        # batch, so this is already the global order of prompts_all (batch-major)
        global_r = torch.cat([t.gather(r) for r in rewards]).cpu()
        P, B, nb = t.acc.num_processes, t.local_batch, cfg.train.batches_per_epoch
        if self.args.per_prompt_stats:
            adv = torch.as_tensor(self.tracker.update(prompts_all, global_r.numpy()), dtype=torch.float32)
        else:
            adv = (global_r - global_r.mean()) / (global_r.std() + 1e-6)
        adv = adv.view(nb, P, B)[:, t.acc.process_index].reshape(-1).to(t.device)
        data = {"traj": traj, "adv": adv.clamp(-self.args.adv_clip, self.args.adv_clip), "epoch": epoch}
        metrics = {"reward_mean": float(global_r.mean()), "reward_std": float(global_r.std()),
                   "local_reward_mean": float(local_r.mean())}
        return data, metrics

    def micro_steps(self, data):
        traj, adv, epoch = data["traj"], data["adv"], data["epoch"]
        T, N = traj.num_steps, adv.shape[0]
        n_train = max(1, int(round(T * self.args.timestep_fraction)))
        for inner in range(self.args.inner_epochs):
            g = torch.Generator().manual_seed(seed_for(self.t.cfg.seed, "ddpo-perm", epoch, inner))
            perm = torch.randperm(N, generator=g)
            steps = torch.randperm(T, generator=g)[:n_train].sort().values.tolist()
            for rows in perm.chunk(self.args.minibatches):
                mb = traj.select(rows.to(traj.latents.device))
                for j, step in enumerate(steps):
                    yield Micro(self._loss_fn(mb, adv[rows], step, n_train), step=j == len(steps) - 1)

    def _loss_fn(self, mb, adv, step, n_train):
        def compute():
            lp = trajectory.rescore(self.t.policy, mb, step, reduction=self.t.cfg.sampling.logprob)
            loss, info = ddpo_loss(lp, mb.log_probs[:, step], adv, self.args.clip_range)
            return loss / n_train, {"loss": loss.detach(), **info}

        return compute

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
