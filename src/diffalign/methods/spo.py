"""SPO (Liang et al. 2024): step-level preference with random continuation (METHODS.md §3).

The first `single_path_steps` steps run as a single path; at every later step k
candidates are drawn from the shared x_t (branching mode), each scored by the step
reward r(c, x0_hat(candidate)) (one extra model pass at the candidate's timestep,
through `trainer.score`; after the last step the candidate is x0 itself). The
(best, worst) pair is kept only if the softmax gap p_best - p_worst of the scores
exceeds `threshold` (0.3), with softmax(scores / temperature). Temperature 1.0 by
default (the softmax of log-probability rewards compares likelihoods directly); on
digits the candidates' classifier log-probs differ by only ~0.01-0.5 nats late in
sampling, so configs/spo_digits.yaml uses 0.05 (measured: at 1.0 ~1% of branches passed the gap, at 0.05 ~30%).
The next x_t is a *random* candidate (not the best).
Loss: the shared clipped DPO loss with β = 10 conditioned on the shared x_t.

Decisions: `sampling.logprob: mean` (SPO's β 10 is set for the averaged scale).
Reward queries per sample: k · (num_steps - single_path_steps) + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from ..seeding import seed_for
from .preference import Pairs, PreferenceConfig, PreferenceMethod, make_pairs, pair_metrics


@register
class SPO(PreferenceMethod):
    name = "spo"
    description = "SPO: k candidates per step from a shared x_t, best/worst pair if the softmax gap is large, random continuation"
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-5}

    @dataclass
    class Config(PreferenceConfig):
        beta: float = 10.0
        k: int = 4
        single_path_steps: int = 10
        threshold: float = 0.3
        temperature: float = 1.0

        def validate(self, where):
            if self.k < 2:
                raise ValueError(f"config key '{where}.k' must be >= 2")
            super().validate(where)

    def choose_fn(self, prompts, cond, timesteps, gen):
        def choose(br):
            k = br.children.shape[1]
            scores = torch.stack([self.step_reward(br.children[:, j], br.step, cond, prompts, timesteps)
                                  for j in range(k)], dim=1)
            p = torch.softmax(scores / self.args.temperature, dim=1)
            br.info.update(scores=scores, best=scores.argmax(1), worst=scores.argmin(1),
                           keep=(p.max(1).values - p.min(1).values) > self.args.threshold)
            return torch.randint(k, (len(prompts),), generator=gen).to(br.children.device)

        return choose

    def collect(self, epoch: int):
        t, cfg = self.t, self.t.cfg
        n, T = cfg.train.batch_size, cfg.sampling.num_steps
        pairs, rewards = [], []
        t.model.scheduler.set_timesteps(T, device=t.device)
        timesteps = t.model.scheduler.timesteps.detach().cpu()
        for b in range(cfg.train.batches_per_epoch):
            prompts = t.draw_prompts(epoch, b, n=n)
            local = prompts[t.local_slice(n)]
            cond = t.model.encode_prompts(list(local))
            gen = torch.Generator().manual_seed(seed_for(cfg.seed, "spo-continue", epoch, b, t.acc.process_index))
            traj = self.sample(local, t.sample_generators("spo", epoch, b, n_global=n),
                               branch_steps=range(self.args.single_path_steps, T), k=self.args.k,
                               choose=self.choose_fn(local, cond, timesteps, gen))
            for br in traj.branches:
                rows = torch.arange(len(local), device=br.children.device)
                pairs.append(make_pairs(br.x_t, br.x_t, br.children[rows, br.info["best"]],
                                        br.children[rows, br.info["worst"]], br.timestep, traj.cond, br.info["keep"]))
            rewards.append(t.score(t.model.decode(traj.final), local))
        pairs = self.add_reference(Pairs.cat(pairs))
        return {"pairs": pairs, "epoch": epoch}, pair_metrics(pairs, torch.cat(rewards), t)
