"""TailorPO and TailorPO-G (seed 004; METHODS.md §4): step-level preference, winner continues.

At each trained step two children x^0, x^1 are drawn from the *same* x_t (branching
mode of `trajectory.sample`), ranked by the step reward r_t(c, x) = r(c, x0_hat(x))
(one extra model pass at the child's timestep, through `trainer.score`; after the
last step the child is x0 itself), and the clipped DPO loss
(`preference.clipped_dpo_loss`) is applied conditioned on the shared x_t. The winner
continues the trajectory. Exactly tied rewards give no pair (the first child continues).

Trained steps `args.train_steps` are given as the paper's remaining-step counts
t (default 20, 16, 12, 8, 4 of 20), i.e. step index num_steps - t.

TailorPO-G (`guidance: true`; registered as `tailorpo-g`): before the loss the winner
is moved by x+ = x_w - η_t ∇_x (r_high - r_t(x_w))², r_high = r_t(x_w) + δ (detached),
i.e. x+ = x_w + 2 δ η_t ∇_x r_t(x_w); η_t follows a cosine schedule from eta_max at
timestep 0 to eta_min at the last training timestep (larger for small t). x+ is kept
only where its step reward is higher; then it replaces x_w both in the pair and as
the continued state. The gradient goes through the x0_hat model pass.

Ablations (reproducing the paper's): `same_condition: false` = step-level ranking only
(two independent trajectories from different x_T; at each trained step their next
states are ranked by step reward and paired with their own, different x_t);
`same_condition: true` adds same-condition branching (TailorPO); `guidance: true`
adds gradient guidance (TailorPO-G).

Decisions: `sampling.logprob: mean` (β 0.1 and ε 0.1 come from D3PO's averaged scale;
the paper says "as D3PO").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from . import register
from .preference import Pairs, PreferenceConfig, PreferenceMethod, make_pairs, pair_metrics


@dataclass
class TailorConfig(PreferenceConfig):
    minibatches: int = 2
    train_steps: list[int] = field(default_factory=lambda: [20, 16, 12, 8, 4])  # remaining steps t of num_steps
    same_condition: bool = True  # false: ablation (1), two independent paths ranked per step
    guidance: bool = False  # TailorPO-G gradient guidance of the winner
    delta: float = 0.5  # r_high = r_t + delta
    eta_min: float = 0.1
    eta_max: float = 0.2

    def validate(self, where):
        super().validate(where)
        if not self.train_steps or min(self.train_steps) < 1:
            raise ValueError(f"config key '{where}.train_steps' must be remaining-step counts >= 1")


@register
class TailorPO(PreferenceMethod):
    name = "tailorpo"
    description = "TailorPO: two children from the same x_t ranked by step reward r(x0_hat), clipped DPO, winner continues"
    defaults = {"sampling.logprob": "mean", "optim.lr": 3e-5}
    Config = TailorConfig

    def __init__(self, trainer, args):
        super().__init__(trainer, args)
        if args.guidance and not trainer.reward.differentiable:
            raise ConfigError(f"'guidance: true' needs a differentiable reward, but '{trainer.reward.name}' is not")
        T = trainer.cfg.sampling.num_steps
        if max(args.train_steps) > T:
            raise ConfigError(f"args.train_steps {args.train_steps} exceed sampling.num_steps = {T}")
        self.steps = sorted({T - s for s in args.train_steps})

    # ---- step reward and guidance ---------------------------------------------
    def eta_schedule(self, timestep: int) -> float:
        """Cosine: eta_max at timestep 0, eta_min at the last training timestep."""
        T = self.t.model.scheduler.config.num_train_timesteps
        c = 0.5 * (1 + math.cos(math.pi * min(max(timestep, 0), T) / T))
        return self.args.eta_min + (self.args.eta_max - self.args.eta_min) * c

    def guide(self, x_w, step, cond, prompts, timesteps, r_w):
        """x+ = x_w - η ∇_x (r_high - r_t(x_w))², kept where r_t(x+) > r_t(x_w). Returns (x, r, moved)."""
        t_child = int(timesteps[step + 1]) if step + 1 < len(timesteps) else 0
        eta = self.eta_schedule(t_child)
        with torch.enable_grad():
            x = x_w.detach().clone().requires_grad_(True)
            r = self.step_reward(x, step, cond, prompts, timesteps)
            r_high = r.detach() + self.args.delta
            (grad,) = torch.autograd.grad(((r_high - r) ** 2).sum(), x)
        x_plus = (x_w - eta * grad).detach()
        with torch.no_grad():
            r_plus = self.step_reward(x_plus, step, cond, prompts, timesteps)
        better = r_plus > r_w
        shape = (-1, *[1] * (x_w.ndim - 1))
        return torch.where(better.view(shape), x_plus, x_w), torch.where(better, r_plus, r_w), better

    def make_choose(self, prompts, cond, timesteps, log):
        def choose(br):
            k = br.children.shape[1]
            scores = torch.stack([self.step_reward(br.children[:, j], br.step, cond, prompts, timesteps)
                                  for j in range(k)], dim=1)
            win = scores.argmax(1)
            rows = torch.arange(len(win), device=win.device)
            br.info["scores"] = scores
            br.info["keep"] = scores.max(1).values != scores.min(1).values
            if self.args.guidance:
                x_new, r_new, moved = self.guide(br.children[rows, win], br.step, cond, prompts, timesteps,
                                                 scores[rows, win])
                br.children[rows, win] = x_new  # in place: the guided winner also continues
                scores[rows, win] = r_new
                log.setdefault("guided", []).append(moved.float().mean())
            return win

        return choose

    def collect(self, epoch: int):
        t, cfg = self.t, self.t.cfg
        n = cfg.train.batch_size
        pairs, rewards, log = [], [], {}
        for b in range(cfg.train.batches_per_epoch):
            prompts = t.draw_prompts(epoch, b, n=n)
            local = prompts[t.local_slice(n)]
            gens = t.sample_generators("tailorpo", epoch, b, n_global=n)
            if self.args.same_condition:
                cond = t.model.encode_prompts(list(local))
                traj = self.sample(local, gens, branch_steps=self.steps, k=2,
                                   choose=self.make_choose(local, cond, self._timesteps(), log))
                for br in traj.branches:
                    rows = torch.arange(len(local), device=br.children.device)
                    w = br.chosen
                    pairs.append(make_pairs(br.x_t, br.x_t, br.children[rows, w], br.children[rows, 1 - w],
                                            br.timestep, traj.cond, br.info["keep"]))
                rewards.append(t.score(t.model.decode(traj.final), local))
            else:
                gens2 = t.sample_generators("tailorpo-2", epoch, b, n_global=n)
                a, c = self.sample(local, gens), self.sample(local, gens2)
                for i in self.steps:
                    ra = self.step_reward(a.latents[:, i + 1], i, a.cond, local, a.timesteps)
                    rc = self.step_reward(c.latents[:, i + 1], i, c.cond, local, c.timesteps)
                    aw = (ra > rc).view(-1, *[1] * (a.latents.ndim - 2))
                    sel = lambda u, v: torch.where(aw, u, v)
                    pairs.append(make_pairs(sel(a.latents[:, i], c.latents[:, i]), sel(c.latents[:, i], a.latents[:, i]),
                                            sel(a.latents[:, i + 1], c.latents[:, i + 1]),
                                            sel(c.latents[:, i + 1], a.latents[:, i + 1]),
                                            a.timesteps[i], a.cond, ra != rc))
                rewards += [t.score(t.model.decode(a.final), local), t.score(t.model.decode(c.final), local)]
        pairs = self.add_reference(Pairs.cat(pairs))
        metrics = pair_metrics(pairs, torch.cat(rewards), t)
        if "guided" in log:
            metrics["guided_frac"] = float(torch.stack(log["guided"]).mean())
        return {"pairs": pairs, "epoch": epoch}, metrics

    def _timesteps(self):
        s = self.t.model.scheduler
        s.set_timesteps(self.t.cfg.sampling.num_steps, device=self.t.device)
        return s.timesteps.detach().cpu()


@dataclass
class TailorGConfig(TailorConfig):
    guidance: bool = True


@register
class TailorPOG(TailorPO):
    name = "tailorpo-g"
    description = "TailorPO-G: TailorPO with the winner moved by the step-reward gradient (needs a differentiable reward)"
    requires_differentiable_reward = True
    Config = TailorGConfig
