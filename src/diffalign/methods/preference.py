"""Shared pieces of the online preference methods D3PO, SPO, TailorPO(-G) (METHODS.md §2-4).

- `clipped_dpo_loss`: the per-step clipped DPO loss
  `-log σ(β·log clip(r_w, 1±ε) - β·log clip(r_l, 1±ε))`, r = π_θ/π_ref = exp(logp_θ - logp_ref).
  The clip is applied to the log-ratio (clamp to [log(1-ε), log(1+ε)]), which equals
  log of the clipped ratio; outside the range the gradient is zero (as in D3PO's code).
- `Pairs`: preference pairs of single denoising steps. Each pair has its own
  conditions x_t^w, x_t^l (equal for the step-level methods, different for D3PO),
  the two next states x^w, x^l, the timestep, the prompt condition, and the reference
  log-probs computed at collect time with the frozen base (`trainer.reference()`).
- `PreferenceMethod`: the common training half (micro-batches over all pairs, the
  policy log-probs via `predict_eps(t.policy, ...)` + `step_with_logprob(prev_sample=...)`).
  Subclasses implement `collect` returning `Pairs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import trajectory
from ..sampling import step_with_logprob
from ..seeding import seed_for
from . import Micro


def clipped_dpo_loss(logp_w, ref_w, logp_l, ref_l, beta: float, clip: float):
    """Mean over the batch of -log σ(β·clip(logr_w) - β·clip(logr_l)), plus diagnostics.

    `clip` = ε; a clip <= 0 or >= 1 disables the lower/upper bound being meaningful, so
    clip must be in (0, 1) or None (no clipping).
    """
    lr_w, lr_l = logp_w - ref_w, logp_l - ref_l
    if clip is not None:
        lo, hi = math.log(1.0 - clip), math.log(1.0 + clip)
        lr_w, lr_l = lr_w.clamp(lo, hi), lr_l.clamp(lo, hi)
    z = beta * (lr_w - lr_l)
    loss = -torch.nn.functional.logsigmoid(z).mean()
    info = {"accuracy": (z > 0).float().mean().detach(), "margin": z.mean().detach(),
            "logratio_w": (logp_w - ref_w).mean().detach(), "logratio_l": (logp_l - ref_l).mean().detach()}
    return loss, info


def step_logprob(model, x_t, t, cond, x_prev, *, eta, guidance_scale, reduction, num_steps):
    """log π(x_prev | x_t, c) under `model` (gradients flow to its parameters); t may be (B,)."""
    if model.scheduler.num_inference_steps != num_steps:
        model.scheduler.set_timesteps(num_steps, device=x_t.device)
    t = torch.as_tensor(t, device=x_t.device)
    eps = trajectory.predict_eps(model, x_t, t, cond, guidance_scale)
    return step_with_logprob(model.scheduler, eps, t, x_t, eta=eta, prev_sample=x_prev, reduction=reduction).log_prob


@dataclass
class PreferenceConfig:
    """The `args:` every online preference method shares; a method's Config subclasses it
    (overriding defaults, adding its own keys, extending `validate`)."""

    beta: float = 0.1
    clip: float = 0.1  # ratio clipped to [1 - clip, 1 + clip]
    inner_epochs: int = 1
    minibatches: int = 4  # optimizer steps per inner epoch (pairs split evenly)

    def validate(self, where):
        if not 0 < self.clip < 1:
            raise ValueError(f"config key '{where}.clip' must be in (0, 1)")


@dataclass
class Pairs:
    """N step-level preference pairs (all tensors have N rows)."""

    x_t_w: torch.Tensor
    x_t_l: torch.Tensor
    x_w: torch.Tensor
    x_l: torch.Tensor
    t: torch.Tensor  # (N,) timesteps
    cond: torch.Tensor | None
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None

    def __len__(self):
        return self.x_w.shape[0]

    def select(self, rows) -> "Pairs":
        f = lambda v: None if v is None else v[rows]
        return Pairs(*(f(getattr(self, k)) for k in ("x_t_w", "x_t_l", "x_w", "x_l", "t", "cond", "ref_w", "ref_l")))

    @staticmethod
    def cat(items: list["Pairs"]) -> "Pairs":
        items = [p for p in items if len(p)]
        if not items:
            return None
        f = lambda k: None if getattr(items[0], k) is None else torch.cat([getattr(p, k) for p in items])
        return Pairs(*(f(k) for k in ("x_t_w", "x_t_l", "x_w", "x_l", "t", "cond", "ref_w", "ref_l")))


def make_pairs(x_t_w, x_t_l, x_w, x_l, t, cond, keep=None) -> Pairs:
    """Pairs from batch tensors; `t` an int or (B,) tensor; `keep` a (B,) bool mask."""
    n = x_w.shape[0]
    t = torch.as_tensor(t, device=x_w.device).long().expand(n).clone()
    p = Pairs(x_t_w, x_t_l, x_w, x_l, t, cond)
    if keep is not None:
        p = p.select(keep.nonzero().flatten())
    return p


class PreferenceMethod:
    """Base of the DPO-style online methods. Subclass Config extends `PreferenceConfig`. `self.pairs_collected` counts pairs for metrics."""

    requires_logprob = True
    requires_reference = True
    requires_differentiable_reward = False

    def __init__(self, trainer, args):
        self.t, self.args = trainer, args

    # ---- helpers for collect ---------------------------------------------------
    def sample(self, prompts, generator, **kw):
        s = self.t.cfg.sampling
        return trajectory.sample(self.t.model, prompts, num_steps=s.num_steps, eta=s.eta,
                                 guidance_scale=s.guidance_scale, reduction=s.logprob, generator=generator, **kw)

    def step_reward(self, x, step: int, traj_or_cond, prompts, timesteps):
        """r_t(c, x) = r(c, x0_hat(x)) for a child x produced by step `step` (x is at
        timestep timesteps[step+1]; after the last step x is x0 itself). Goes through t.score."""
        cond = traj_or_cond
        if step + 1 < len(timesteps):
            t_next = timesteps[step + 1].to(x.device)
            x0 = trajectory.x0_hat(self.t.model, x, t_next, cond, self.t.cfg.sampling.guidance_scale)
        else:
            x0 = x
        return self.t.score(self.t.model.decode(x0), prompts)

    def add_reference(self, pairs: Pairs) -> Pairs:
        """Reference log-probs of the stored children under the frozen base (no grad)."""
        if pairs is None:
            return None
        s, t = self.t.cfg.sampling, self.t
        kw = dict(eta=s.eta, guidance_scale=s.guidance_scale, reduction=s.logprob, num_steps=s.num_steps)
        with torch.no_grad(), t.reference():
            pairs.ref_w = step_logprob(t.model, pairs.x_t_w, pairs.t, pairs.cond, pairs.x_w, **kw)
            pairs.ref_l = step_logprob(t.model, pairs.x_t_l, pairs.t, pairs.cond, pairs.x_l, **kw)
        return pairs

    # ---- training --------------------------------------------------------------
    def micro_steps(self, data):
        """The same number of optimizer steps on every process (DDP all-reduces each step):
        pair counts can differ between processes (ties skipped, SPO's gap rule), so the
        count comes from the largest, and a process out of pairs takes a zero-loss step
        through the model (its gradient contribution is zero)."""
        pairs, epoch = data["pairs"], data["epoch"]
        N = 0 if pairs is None else len(pairs)
        n_max = int(self.t.gather(torch.tensor([N], device=self.t.device)).max())
        if n_max == 0:
            return
        chunks = min(self.args.minibatches, n_max)
        for inner in range(self.args.inner_epochs):
            g = torch.Generator().manual_seed(seed_for(self.t.cfg.seed, f"{self.name}-perm", epoch, inner))
            parts = list(torch.randperm(N, generator=g).chunk(min(chunks, N))) if N else []
            parts += [None] * (chunks - len(parts))
            for rows in parts:
                mb = None if rows is None else pairs.select(rows.to(pairs.x_w.device))
                yield Micro(self._loss_fn(mb), step=True)

    def _loss_fn(self, mb: Pairs | None):
        def compute():
            if mb is None:
                return self._zero_loss(), {}
            s, pol = self.t.cfg.sampling, self.t.policy
            kw = dict(eta=s.eta, guidance_scale=s.guidance_scale, reduction=s.logprob, num_steps=s.num_steps)
            lp_w = step_logprob(pol, mb.x_t_w, mb.t, mb.cond, mb.x_w, **kw)
            lp_l = step_logprob(pol, mb.x_t_l, mb.t, mb.cond, mb.x_l, **kw)
            loss, info = clipped_dpo_loss(lp_w, mb.ref_w, lp_l, mb.ref_l, self.args.beta, self.args.clip)
            return loss, {"loss": loss.detach(), **info}

        return compute

    def _zero_loss(self):
        """A loss of exactly 0 that still runs the (wrapped) policy, so gradient sync happens."""
        pol = self.t.policy
        x = torch.zeros(1, *pol.sample_shape, device=self.t.device)
        cond = pol.encode_prompts(self.t.prompts[:1])
        t = torch.tensor([int(pol.scheduler.config.num_train_timesteps) // 2], device=self.t.device)
        return 0.0 * pol.predict_noise(x, t, cond).sum()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pair_metrics(pairs: Pairs | None, rewards: torch.Tensor | None, t) -> dict:
    """Pairs kept, and the training-batch reward (None: labels came from people, no reward)."""
    m = {"pairs": float(0 if pairs is None else len(pairs))}
    if rewards is not None:
        g = t.gather(rewards).cpu()
        m.update(reward_mean=float(g.mean()), reward_std=float(g.std()))
    return m
