"""SPO (Liang et al. 2024): step-level preference with random continuation (METHODS.md §3).

The first `single_path_steps` steps run as a single path; at every later step k
candidates are drawn from the shared x_t (`Sampler.children`), each scored by the step
reward r(c, x0_hat(candidate)) (`preference.step_reward`: one extra model pass at the
candidate's timestep, through `run.score`; after the last step the candidate is x0
itself). The (best, worst) pair is kept only if the softmax gap p_best - p_worst of the
scores exceeds `threshold` (0.3), with softmax(scores / temperature). Temperature 1.0 by
default (the softmax of log-probability rewards compares likelihoods directly); on
digits the candidates' classifier log-probs differ by only ~0.01-0.5 nats late in
sampling, so configs/spo_digits.yaml uses 0.05 (measured: at 1.0 ~1% of branches passed
the gap, at 0.05 ~30%). The next x_t is a *random* candidate (not the best), drawn per
global sample index, so the run is the same for any number of processes.
Loss: the shared clipped DPO loss (`losses.dpo_loss`) with β = 10, conditioned on the shared x_t.

Decisions: `sampling.logprob: mean` (SPO's β 10 is set for the averaged scale).
Reward queries per sample: k · (num_steps - single_path_steps) + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..trajectory import Trajectory
from . import Method, register
from .preference import (Branch, PairsBatch, PreferenceConfig, StepPairs, make_pairs, pair_keys, pair_metrics,
                         pair_micro_steps, step_reward, with_reference)


@register
class SPO(Method):
    name = "spo"
    description = "SPO: k candidates per step from a shared x_t, best/worst pair if the softmax gap is large, random continuation"
    requires_logprob = True
    requires_reference = True
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-5}

    @dataclass
    class Config(PreferenceConfig):
        beta: float = 10.0
        k: int = 4  # candidates per step
        single_path_steps: int = 10  # steps sampled as one path before branching starts
        threshold: float = 0.3  # keep a pair only if the softmax gap of its scores exceeds this
        temperature: float = 1.0  # softmax(scores / temperature)

        def validate(self, where):
            if self.k < 2:
                raise ValueError(f"config key '{where}.k' must be >= 2")
            super().validate(where)

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.sampler = run.sampler

    def rollout(self, slot, epoch: int):
        """One branching path per prompt of a rollout batch (a `Slot`) -> (the trajectory that continued,
        kept pairs, branches)."""
        run, s, m, a = self.run, self.sampler, self.run.model, self.args
        prompts, generators, n = slot.local, slot.generators, len(slot.prompts)
        ts = s.timesteps(m)
        cond = m.encode_prompts(list(prompts))
        x = s.noise(m, len(prompts), generators)
        rows = torch.arange(len(prompts), device=x.device)
        continue_gen = run.generator("spo-continue", epoch, slot.index)
        xs, lps, outs, x0s, pairs, branches = [x], [], [], [], [], []
        for i, t in enumerate(ts):
            out = s.predict(m, x, t, cond)
            if i < a.single_path_steps:
                step = s.step(m, x, t, cond, generator=generators, output=out)
                x, lp, x0 = step.prev_sample, step.log_prob, step.x0_pred
            else:
                ch = s.children(m, x, t, cond, a.k, generators, output=out)
                scores = torch.stack([step_reward(run, s, ch.samples[:, j], i, ts, cond, prompts) for j in range(a.k)], 1)
                p = torch.softmax(scores / a.temperature, dim=1)
                keep = (p.max(1).values - p.min(1).values) > a.threshold
                pairs.append(make_pairs(x, x, ch.samples[rows, scores.argmax(1)], ch.samples[rows, scores.argmin(1)], t,
                                        cond, pair_keys(slot, i, len(ts)), keep))
                pick = run.own(torch.randint(a.k, (n,), generator=continue_gen)).to(x.device)
                branches.append(Branch(i, x, ch.samples, scores, pick))
                x, lp, x0 = ch.samples[rows, pick], ch.log_probs[rows, pick], ch.x0_pred
            xs.append(x), lps.append(lp), outs.append(out), x0s.append(x0)
        return Trajectory.from_steps(prompts, cond, ts, xs, lps, outs, x0s), pairs, branches

    def collect(self, epoch: int):
        run = self.run
        pairs, rewards = [], []
        for slot in run.slots(epoch, "spo"):
            traj, kept, _ = self.rollout(slot, epoch)
            pairs += kept
            rewards.append(run.score(run.model.decode(traj.final), slot.local))
        pairs = with_reference(run, self.sampler, StepPairs.cat(pairs))
        return PairsBatch(pairs, epoch), pair_metrics(run, pairs, torch.cat(rewards))

    def micro_steps(self, batch: PairsBatch):
        return pair_micro_steps(self.run, self.sampler, batch.pairs, self.args, self.name, batch.epoch)
