"""TailorPO and TailorPO-G (Ren, Zhang, Liu, Zhang & Tian, "Refining Alignment Framework for Diffusion Models
with Intermediate-Step Preference Ranking", arXiv 2502.01667; METHODS.md §4): step-level preference, winner
continues.

At each trained step two children x^0, x^1 are drawn from the *same* x_t
(`Sampler.children`, in the rollout loop written out below), ranked by the step reward
r_t(c, x) = r(c, x0_hat(x)) (`preference.step_reward`: one extra model pass at the
child's timestep, through `run.score`; after the last step the child is x0 itself), and
the clipped DPO loss (`losses.dpo_loss`) is applied conditioned on the shared x_t. The
winner continues the trajectory. Exactly tied rewards give no pair (the first child
continues).

Trained steps `args.train_steps` are given as the paper's remaining-step counts
t (default 20, 16, 12, 8, 4 of 20), i.e. step index num_steps - t.

TailorPO-G (`guidance: true`; registered as `tailorpo-g`): before the loss the winner
is moved by x+ = x_w - η_t ∇_x (r_high - r_t(x_w))², r_high = r_t(x_w) + δ (detached),
i.e. x+ = x_w + 2 δ η_t ∇_x r_t(x_w); η_t follows a cosine schedule from eta_max at
timestep 0 to eta_min at the last training timestep (larger for small t). x+ is kept
only where its step reward is higher; then it replaces x_w both in the pair and as
the continued state, and the rollout's stored log-prob of that step is the one of x+
under the step's Gaussian. The gradient goes through the x0_hat model pass.

Ablations (reproducing the paper's): `same_condition: false` = step-level ranking only
(two independent trajectories from different x_T; at each trained step their next
states are ranked by step reward and paired with their own, different x_t);
`same_condition: true` adds same-condition branching (TailorPO); `guidance: true`
adds gradient guidance (TailorPO-G). `tailorpo-g` is this class registered again with
`guidance: true` by default and a differentiable reward required.

Decisions: `sampling.logprob: mean` (β 0.1 and ε 0.1 come from D3PO's averaged scale;
the paper says "as D3PO").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..sampling import gaussian_log_prob
from ..trajectory import Trajectory
from . import Method, register, register_variant
from .preference import (Branch, PairsBatch, PreferenceConfig, StepPairs, make_pairs, pair_keys, pair_metrics,
                         pair_micro_steps, step_reward, with_reference)


@dataclass
class TailorConfig(PreferenceConfig):
    minibatches: int = 2
    train_steps: list[int] = field(default_factory=lambda: [20, 16, 12, 8, 4])  # remaining steps t of num_steps
    same_condition: bool = True  # false: ablation (1), two independent paths ranked per step
    guidance: bool = False  # TailorPO-G gradient guidance of the winner
    delta: float = 0.5  # r_high = r_t + delta
    eta_min: float = 0.1  # guidance step size at the noisiest training timestep
    eta_max: float = 0.2  # guidance step size at timestep 0

    def validate(self, where):
        super().validate(where)
        if not self.train_steps or min(self.train_steps) < 1:
            raise ValueError(f"config key '{where}.train_steps' must be remaining-step counts >= 1")


@dataclass
class TailorGConfig(TailorConfig):
    guidance: bool = True


@register
class TailorPO(Method):
    name = "tailorpo"
    description = "TailorPO: two children from the same x_t ranked by step reward r(x0_hat), clipped DPO, winner continues"
    requires_logprob = True
    requires_reference = True
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-5}
    Config = TailorConfig

    def __init__(self, run, args: TailorConfig):
        self.run, self.args = run, args
        self.sampler = run.sampler
        if args.guidance and not run.reward.differentiable:
            raise ConfigError(f"'guidance: true' needs a differentiable reward, but '{run.reward.name}' is not")
        T = run.cfg.sampling.num_steps
        if max(args.train_steps) > T:
            raise ConfigError(f"args.train_steps {args.train_steps} exceed sampling.num_steps = {T}")
        self.steps = sorted({T - s for s in args.train_steps})

    # ---- step reward and guidance ---------------------------------------------
    def eta_schedule(self, timestep: int) -> float:
        """Cosine: eta_max at timestep 0, eta_min at the last training timestep."""
        T = self.run.model.scheduler.config.num_train_timesteps
        c = 0.5 * (1 + math.cos(math.pi * min(max(timestep, 0), T) / T))
        return self.args.eta_min + (self.args.eta_max - self.args.eta_min) * c

    def guide(self, x_w, step, cond, prompts, timesteps, r_w):
        """x+ = x_w - η ∇_x (r_high - r_t(x_w))², kept where r_t(x+) > r_t(x_w). Returns (x, r, moved)."""
        run, s = self.run, self.sampler
        t_child = int(timesteps[step + 1]) if step + 1 < len(timesteps) else 0
        eta = self.eta_schedule(t_child)
        with torch.enable_grad():
            x = x_w.detach().clone().requires_grad_(True)
            r = step_reward(run, s, x, step, timesteps, cond, prompts)
            r_high = r.detach() + self.args.delta
            (grad,) = torch.autograd.grad(((r_high - r) ** 2).sum(), x)
        x_plus = (x_w - eta * grad).detach()
        with torch.no_grad():
            r_plus = step_reward(run, s, x_plus, step, timesteps, cond, prompts)
        better = r_plus > r_w
        shape = (-1, *[1] * (x_w.ndim - 1))
        return torch.where(better.view(shape), x_plus, x_w), torch.where(better, r_plus, r_w), better

    # ---- sampling ---------------------------------------------------------------
    def rollout(self, slot, log: dict):
        """One path per prompt of a rollout batch (a `Slot`) that branches in two at the trained steps; the
        winner (guided with TailorPO-G) continues. Returns (the trajectory that continued, the pairs, the
        branches)."""
        run, s, m = self.run, self.sampler, self.run.model
        prompts, generators = slot.local, slot.generators
        ts = s.timesteps(m)
        cond = m.encode_prompts(list(prompts))
        x = s.noise(m, len(prompts), generators)
        rows = torch.arange(len(prompts), device=x.device)
        xs, lps, outs, x0s, pairs, branches = [x], [], [], [], [], []
        for i, t in enumerate(ts):
            out = s.predict(m, x, t, cond)
            if i not in self.steps:
                step = s.step(m, x, t, cond, generator=generators, output=out)
                x, lp, x0 = step.prev_sample, step.log_prob, step.x0_pred
            else:
                ch = s.children(m, x, t, cond, 2, generators, output=out)
                scores = torch.stack([step_reward(run, s, ch.samples[:, j], i, ts, cond, prompts) for j in range(2)], 1)
                win = scores.argmax(1)
                branches.append(Branch(i, x, ch.samples, scores, win))
                x_w = ch.samples[rows, win]
                if self.args.guidance:
                    x_w, _, moved = self.guide(x_w, i, cond, prompts, ts, scores[rows, win])
                    log.setdefault("guided", []).append(moved.float().mean())
                pairs.append(make_pairs(x, x, x_w, ch.samples[rows, 1 - win], t, cond,
                                        pair_keys(slot, i, len(ts)), scores.max(1).values != scores.min(1).values))
                x, x0 = x_w, ch.x0_pred
                lp = gaussian_log_prob(x_w, ch.mean, ch.std, s.reduction)  # the guided winner's own log-prob
            xs.append(x), lps.append(lp), outs.append(out), x0s.append(x0)
        return Trajectory.from_steps(prompts, cond, ts, xs, lps, outs, x0s), pairs, branches

    def ranked_paths(self, slot, epoch: int) -> tuple[list[torch.Tensor], list[StepPairs]]:
        """Ablation (1): two independent paths; at each trained step their next states are ranked by
        step reward and paired with their own, different x_t."""
        run, s, prompts = self.run, self.sampler, slot.local
        a = s.sample(run.model, prompts, generator=slot.generators)
        c = s.sample(run.model, prompts, generator=run.sample_generators("tailorpo-2", epoch, slot.index,
                                                                         n_global=len(slot.prompts)))
        pairs = []
        for i in self.steps:
            ra = step_reward(run, s, a.latents[:, i + 1], i, a.timesteps, a.cond, prompts)
            rc = step_reward(run, s, c.latents[:, i + 1], i, c.timesteps, c.cond, prompts)
            aw = (ra > rc).view(-1, *[1] * (a.latents.ndim - 2))
            sel = lambda u, v: torch.where(aw, u, v)  # noqa: E731
            pairs.append(make_pairs(sel(a.latents[:, i], c.latents[:, i]), sel(c.latents[:, i], a.latents[:, i]),
                                    sel(a.latents[:, i + 1], c.latents[:, i + 1]),
                                    sel(c.latents[:, i + 1], a.latents[:, i + 1]),
                                    a.timesteps[i], a.cond, pair_keys(slot, i, a.num_steps), ra != rc))
        return [a.final, c.final], pairs

    def collect(self, epoch: int):
        run = self.run
        pairs, rewards, log = [], [], {}
        for slot in run.slots(epoch, "tailorpo"):
            if self.args.same_condition:
                traj, kept, _ = self.rollout(slot, log)
                finals = [traj.final]
            else:
                finals, kept = self.ranked_paths(slot, epoch)
            pairs += kept
            rewards += [run.score(run.model.decode(x), slot.local) for x in finals]
        pairs = with_reference(run, self.sampler, StepPairs.cat(pairs))
        metrics = pair_metrics(run, pairs, torch.cat(rewards))
        if "guided" in log:
            metrics["guided_frac"] = float(torch.stack(log["guided"]).mean())
        return PairsBatch(pairs, epoch), metrics

    def micro_steps(self, batch: PairsBatch):
        return pair_micro_steps(self.run, self.sampler, batch.pairs, self.args, self.name, batch.epoch)


register_variant(TailorPO, name="tailorpo-g", Config=TailorGConfig, requires_differentiable_reward=True,
                 description="TailorPO-G: TailorPO with the winner moved by the step-reward gradient "
                             "(needs a differentiable reward)")
