"""Offline preference methods: Diffusion-DPO (pairs) and Diffusion-KTO (binary labels).

METHODS.md §5 and §6. Both train on a fixed feedback set (`args.data`, see
`diffalign.data.feedback`), query no reward during training (reward_queries stays 0;
evaluation still uses the run's reward) and compare the policy with the frozen base
through `run.reference()`.

Shared decisions:
- Denoising error e = mean over elements of ||target − model output||², x_t from the
  scheduler's `add_noise`, t uniform over [t_min·T, t_max·T); the target is what the
  model predicts (`sampling.training_target`: the noise, the velocity or x0, by the
  scheduler's `prediction_type`).
- The condition is always the prompt's (no label dropout to the null class), so the
  offline methods align the conditional model; evaluate with guidance 1.0 or expect CFG
  to dilute the change.
- Each of `train.batches_per_epoch` batches of `train.batch_size` items is one optimizer
  step. Items, timesteps and noise are drawn globally from generators seeded by (seed,
  method, epoch, batch) and sliced per process, so a run is the same for any number of
  processes.
- The set is loaded and validated in `start()`, before the run folder is written.

Diffusion-DPO: per pair one noise and one t shared by winner and loser; `losses.dpo_loss`
  on the log-ratios −(e_θ − e_ref)/2 (no clipping): L = −log σ(−β/2 · [(e_w − e_l) −
  (e_w^ref − e_l^ref)]); logs `accuracy` (the paper's implicit accuracy).
Diffusion-KTO: per sample g = e_ref − e_θ at a random t with fresh noise, `losses.kto_loss`
  with the reference point z = max(0, mean g) over the *global* batch (gathered from every
  process, as the reference code). The batch is drawn desirable with probability γ (default
  0.8) per item, uniformly within the chosen class. A pairs file is accepted too: it is
  turned into labels by the Pick-a-Pic rule (`feedback.labels_from_pair_set`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..data import latents
from ..losses import denoising_error, dpo_loss, kto_loss, kto_reference_point, logratio_from_errors
from ..sampling import add_noise, training_target
from . import Method, Micro, register


# ---- shared pieces ---------------------------------------------------------------------
def check_args(run, args, name: str) -> tuple[int, int]:
    """Config checks every offline method makes; returns the training-timestep range."""
    if not args.data:
        raise ConfigError(f"method '{name}' needs a feedback set: set config key 'args.data' to a JSONL file "
                          "(build one with `diffalign data pairs ...`)")
    T = run.model.scheduler.config.num_train_timesteps
    t_range = (int(args.t_min * T), int(args.t_max * T))
    if not 0 <= t_range[0] < t_range[1] <= T:
        raise ConfigError("config keys 'args.t_min' < 'args.t_max' must lie in [0, 1]")
    return t_range


def draw_noise(run, shape, t_range, g, n_global):
    """Global timesteps and noise drawn from `g`; this process's rows of them."""
    ts = run.own(torch.randint(*t_range, (n_global,), generator=g)).to(run.device)
    eps = run.own(torch.randn((n_global, *shape), generator=g)).to(run.device)
    return ts, eps


def noised(run, x0, eps, ts):
    """(x_t, the model's training target at x_t)."""
    s = run.model.scheduler
    return add_noise(s, x0, eps, ts), training_target(s, x0, eps, ts)


def errors(model, x_t, ts, target, cond):
    return denoising_error(model.predict_noise(x_t, ts, cond), target)


def reference_errors(run, x_t, ts, target, cond):
    with torch.no_grad(), run.reference():
        return errors(run.model, x_t, ts, target, cond)


@dataclass
class OfflineBatches:
    items: list  # one entry per optimizer step (DPOItems / KTOItems)


@dataclass
class DPOItems:
    x_t_w: torch.Tensor  # (B, *shape) noised winners
    x_t_l: torch.Tensor  # (B, *shape) noised losers (same noise and t)
    t: torch.Tensor  # (B,)
    target_w: torch.Tensor  # (B, *shape)
    target_l: torch.Tensor
    cond: torch.Tensor | None
    ref_w: torch.Tensor  # (B,) reference denoising errors
    ref_l: torch.Tensor


@dataclass
class KTOItems:
    x_t: torch.Tensor  # (B, *shape)
    t: torch.Tensor  # (B,)
    target: torch.Tensor
    cond: torch.Tensor | None
    ref: torch.Tensor  # (B,) reference denoising errors
    desirable: torch.Tensor  # (B,) bool


# ---- Diffusion-DPO ---------------------------------------------------------------------
@register
class DiffusionDPO(Method):
    name = "diffusion-dpo"
    description = "Diffusion-DPO: offline pairwise preferences vs the frozen base, shared noise per pair (Wallace et al. 2024)"
    offline_data = "pairs"  # the feedback file it learns from
    requires_reference = True
    defaults = {"optim.lr": 1e-3}

    @dataclass
    class Config:
        data: str = ""  # pairs JSONL (diffalign data pairs); validated when training starts
        beta: float = 2000.0  # paper: 2000-5000 at the per-element-mean error scale
        t_min: float = 0.0  # timesteps drawn uniformly from [t_min*T, t_max*T)
        t_max: float = 1.0

        def validate(self, where):
            if self.beta <= 0:
                raise ValueError(f"config key '{where}.beta' must be > 0")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.t_range = check_args(run, args, self.name)

    def start(self):
        ps, self.x_w, self.x_l = latents.pairs(self.run.model, self.args.data)
        self.n, self.ties_dropped, self.prompts = len(ps), ps.ties_dropped, ps.prompts

    def collect(self, epoch: int):
        run, n = self.run, self.run.cfg.train.batch_size
        items = []
        for b in range(run.cfg.train.batches_per_epoch):
            g = run.generator(self.name, epoch, b)
            idx = torch.randint(self.n, (n,), generator=g)
            ts, eps = draw_noise(run, self.x_w.shape[1:], self.t_range, g, n)
            idx = run.own(idx)
            cond = run.model.encode_prompts([self.prompts[i] for i in idx.tolist()])
            dev = idx.to(run.device)
            (xw, tw), (xl, tl) = noised(run, self.x_w[dev], eps, ts), noised(run, self.x_l[dev], eps, ts)
            items.append(DPOItems(xw, xl, ts, tw, tl, cond, reference_errors(run, xw, ts, tw, cond),
                                  reference_errors(run, xl, ts, tl, cond)))
        return OfflineBatches(items), {"pairs": float(self.n), "ties_dropped": float(self.ties_dropped)}

    def micro_steps(self, batch: OfflineBatches):
        for items in batch.items:
            yield Micro(self._loss_fn(items))

    def _loss_fn(self, b: DPOItems):
        def compute():
            # one forward for winner and loser (same t, same noise)
            e = errors(self.run.model, torch.cat([b.x_t_w, b.x_t_l]), torch.cat([b.t, b.t]),
                       torch.cat([b.target_w, b.target_l]), None if b.cond is None else torch.cat([b.cond, b.cond]))
            e_w, e_l = e.chunk(2)
            per, info = dpo_loss(logratio_from_errors(e_w, b.ref_w), logratio_from_errors(e_l, b.ref_l),
                                 self.args.beta)
            loss = per.mean()
            return loss, {"loss": loss.detach(), "e_w": e_w.mean().detach(), "e_l": e_l.mean().detach(), **info}

        return compute


# ---- Diffusion-KTO ---------------------------------------------------------------------
@register
class DiffusionKTO(Method):
    name = "diffusion-kto"
    description = "Diffusion-KTO: offline per-sample desirable/undesirable labels, Kahneman-Tversky utility (Li et al. 2024)"
    offline_data = "labels"  # reads pairs too (the Pick-a-Pic rule): the bench's paired regime gives it them
    requires_reference = True
    defaults = {"optim.lr": 1e-3}

    @dataclass
    class Config:
        data: str = ""  # labels JSONL (diffalign data labels), or a pairs JSONL (Pick-a-Pic rule applied)
        beta: float = 5000.0  # paper value (SD1.5)
        lambda_d: float = 1.0  # weight of desirable samples
        lambda_u: float = 1.0  # weight of undesirable samples
        gamma: float = 0.8  # probability that a batch item is drawn from the desirable samples
        utility: str = "sigmoid"  # "sigmoid" (Kahneman-Tversky) or "loss-averse" (log-sigmoid; see losses.kto)
        t_min: float = 0.0  # timesteps drawn uniformly from [t_min*T, t_max*T)
        t_max: float = 1.0

        def validate(self, where):
            if self.utility not in ("sigmoid", "loss-averse"):
                raise ValueError(f"config key '{where}.utility' must be 'sigmoid' or 'loss-averse'")
            if not 0 <= self.gamma <= 1:
                raise ValueError(f"config key '{where}.gamma' must be in [0, 1]")
            if self.beta <= 0 or self.lambda_d < 0 or self.lambda_u < 0:
                raise ValueError(f"config keys '{where}.beta' (> 0), 'lambda_d', 'lambda_u' (>= 0) out of range")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.t_range = check_args(run, args, self.name)

    def start(self):
        ls, self.x = latents.labels(self.run.model, self.args.data)
        self.prompts, self.labels, self.counts = ls.prompts, ls.desirable, ls.counts
        self.pools = (torch.nonzero(~ls.desirable).flatten(), torch.nonzero(ls.desirable).flatten())
        for kind, pool in zip(("undesirable", "desirable"), self.pools):
            wanted = self.args.gamma if kind == "desirable" else 1 - self.args.gamma
            if len(pool) == 0 and wanted > 0:
                raise ValueError(f"{self.args.data}: no {kind} samples, but args.gamma = {self.args.gamma} asks for them")

    def collect(self, epoch: int):
        run, n = self.run, self.run.cfg.train.batch_size
        items = []
        for b in range(run.cfg.train.batches_per_epoch):
            g = run.generator(self.name, epoch, b)
            want_d = torch.rand(n, generator=g) < self.args.gamma
            u = torch.rand(n, generator=g)
            idx = torch.empty(n, dtype=torch.long)
            for d in (False, True):
                pool, m = self.pools[int(d)], want_d == d
                if m.any():
                    idx[m] = pool[(u[m] * len(pool)).long().clamp(max=len(pool) - 1)]
            ts, eps = draw_noise(run, self.x.shape[1:], self.t_range, g, n)
            idx = run.own(idx)
            cond = run.model.encode_prompts([self.prompts[i] for i in idx.tolist()])
            x_t, target = noised(run, self.x[idx.to(run.device)], eps, ts)
            items.append(KTOItems(x_t, ts, target, cond, reference_errors(run, x_t, ts, target, cond),
                                  self.labels[idx].to(run.device)))
        return OfflineBatches(items), {"desirable": float(self.counts["desirable"]),
                                       "undesirable": float(self.counts["undesirable"])}

    def micro_steps(self, batch: OfflineBatches):
        for items in batch.items:
            yield Micro(self._loss_fn(items))

    def _loss_fn(self, b: KTOItems):
        def compute():
            g = b.ref - errors(self.run.model, b.x_t, b.t, b.target, b.cond)
            a = self.args
            z = kto_reference_point(g, self.run.gather)  # over the global batch
            per, info = kto_loss(g, b.desirable, a.beta, z, a.lambda_d, a.lambda_u, a.utility)
            loss = per.mean()
            return loss, {"loss": loss.detach(), **info}

        return compute
