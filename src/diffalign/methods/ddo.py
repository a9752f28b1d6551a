"""DDO: direct distributional optimization (Kawata, Oko, Nitanda & Suzuki, "Direct Distributional Optimization
for Provable Alignment of Diffusion Models", ICLR 2025, arXiv 2502.02954; METHODS.md §8).

Minimises F(q) = L(q) + β·KL(q‖p_ref) over distributions by dual averaging; every iterate
is q_k ∝ exp(−f_k)·p_ref with a potential network f_k, and q_k is sampled with the frozen
pretrained model plus a Doob h-transform correction (`diffalign.doob`). The objectives,
their first variations and the dual-averaging recurrence are in `diffalign.losses.ddo`.

One epoch of the training loop is one dual-averaging iteration k = epoch + 1:

1. collect: the points where g^(k) is evaluated.
   - reward: `batch_size × batches_per_epoch` samples of q_k (through the Doob sampler),
     scored once each and added to a pool of the last `pool_size` samples of past
     iterates (the paper pools 6,400);
   - dpo / kto: the feedback set's images, which are reference samples (a pairs or
     labels JSONL from `diffalign data pairs|labels`); nothing is sampled or queried.
   At `fit_size` points drawn from the pool (paper: 1,024), the target is
   g^(k) = (S_{k−1}·f_k(x) + w_k·δL/δq(q_k)(x)) / S_k, with the first variation clipped
   at `clip` (paper: 20). For dpo/kto, log Z_k = log mean exp(−f_k) over the set's images.
2. update: `fit_epochs` passes of MSE regression of the potential onto the targets in
   minibatches of `fit_batch` (paper: 5 epochs, batch 64, lr 1e-4), warm-started from
   f_k; then, for `estimator: learned`, `correction_steps` steps of the amortised
   correction network on reference samples weighted by exp(−f_{k+1}).

The aligned model is (the pretrained weights, the potential, the Doob sampler): the
denoiser is never trained (its LoRA stays zero and is not saved), final/ holds
`potential.safetensors` (and `correction.safetensors`), and evaluation, `diffalign
sample` and the benchmark sample through `self.sampler`. Checkpoints keep the pool, so a
run resumes at the iteration it stopped at and repeats it exactly.

Every process holds the whole pool and computes the whole minibatch (the loop's average
of identical gradients is that gradient): simple, and right for any number of processes.
Reward queries: one per pooled sample (reward objective); Doob particles and potential
evaluations query nothing, but cost model calls (`diffalign.doob` gives the count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from ..flow import is_flow
from ..doob import ESTIMATORS, DoobCorrection, learned_correction_loss
from ..losses import ddo as da
from ..seeding import seed_for
from . import Method, Micro, Trainable, register, register_variant

OBJECTIVES = ("reward", "dpo", "kto")


class Potential(nn.Module):
    """f(x0, cond) -> (B,): the model's field network at t = 0, averaged over its output."""

    def __init__(self, model):
        super().__init__()
        self.net = model.make_field_net()
        self._forward = model.forward

    def forward(self, x0: torch.Tensor, cond=None) -> torch.Tensor:
        t = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.long)
        return self._forward(self.net, x0, t, cond).flatten(1).mean(1)


@dataclass
class Fit:
    """One iteration's regression set (the same on every process)."""

    x: torch.Tensor  # (N, *shape) points
    cond: torch.Tensor | None
    target: torch.Tensor  # (N,) g^(k)
    epoch: int


@register
class DDO(Method):
    name = "ddo"
    description = ("DDO: dual averaging over distributions q ∝ exp(-f)·p_ref (reward, DPO or KTO objective), "
                   "sampled by a Doob h-transform of the frozen model (Kawata et al. 2025)")
    defaults = {"optim.lr": 1e-4, "optim.grad_clip": 1.0}

    @dataclass
    class Config:
        objective: str = "reward"  # reward (-E_q r), dpo (pairs JSONL in data) or kto (labels JSONL in data)
        data: str = ""  # dpo: pairs JSONL (diffalign data pairs); kto: labels or pairs JSONL
        beta: float = 0.1  # KL weight β in F = L + β KL (paper: 0.04-0.2)
        beta_prime: float = 0.0  # proximal entropy weight β' >= β of dual averaging; 0 = β (the paper's runs)
        option: int = 2  # dual-averaging weights: 1 (uniform) or 2 (linear in k); losses.ddo derives both
        gamma: float = 1.0  # dpo / kto temperature on log q/p_ref
        lambda_d: float = 1.0  # kto: weight of desirable samples
        lambda_u: float = 1.0  # kto: weight of undesirable samples
        clip: float = 20.0  # first variation clipped to [-clip, clip] (paper: 20)
        pool_size: int = 6400  # reward: samples of past iterates kept (paper: 6,400)
        fit_size: int = 1024  # points regressed on per iteration (paper: 1,024)
        fit_epochs: int = 5  # passes over them (paper: 5)
        fit_batch: int = 64  # regression minibatch (paper: 64); lr is optim.lr (paper: 1e-4)
        estimator: str = "continuation"  # Doob correction: continuation, gaussian or learned (diffalign.doob)
        particles: int = 16  # Monte Carlo particles per sample and step
        continuation_steps: int = 20  # continuation: DDPM jumps to x_0 (fewer under-disperse); 0 = the sampler's
        data_var: float = 1.0  # gaussian: prior variance per element of x_0
        reference_samples: int = 1024  # learned: reference samples it is trained on (drawn once)
        correction_steps: int = 100  # learned: optimizer steps per iteration
        correction_lr: float = 1e-3  # learned: its learning rate
        correction_batch: int = 64  # learned: reference samples per optimizer step
        center_targets: bool = False  # subtract the targets' mean (q ∝ exp(−f)·p_ref ignores f's constant, the fit does not)

        def validate(self, where):
            if self.objective not in OBJECTIVES:
                raise ValueError(f"config key '{where}.objective' must be one of {', '.join(OBJECTIVES)}, "
                                 f"got {self.objective!r}")
            if self.beta <= 0:
                raise ValueError(f"config key '{where}.beta' must be > 0 (the KL weight of F = L + β KL; "
                                 f"paper: 0.04-0.2), got {self.beta}")
            if self.beta_prime and self.beta_prime < self.beta:
                raise ValueError(f"config key '{where}.beta_prime' must be >= beta ({self.beta}) or 0 (= beta)")
            if self.option not in da.OPTIONS:
                raise ValueError(f"config key '{where}.option' must be 1 or 2, got {self.option}")
            if self.estimator not in ESTIMATORS:
                raise ValueError(f"config key '{where}.estimator' must be one of {', '.join(ESTIMATORS)}")
            for key in ("pool_size", "fit_size", "fit_epochs", "fit_batch", "particles", "reference_samples",
                        "correction_batch"):
                if getattr(self, key) < 1:
                    raise ValueError(f"config key '{where}.{key}' must be >= 1")
            if self.gamma <= 0 or self.clip <= 0:
                raise ValueError(f"config keys '{where}.gamma' and '{where}.clip' must be > 0")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        if is_flow(run.model.scheduler):
            raise ConfigError(f"method '{self.name}' samples by a Doob h-transform written for DDIM/DDPM schedulers; "
                              f"model '{run.cfg.model}' is a flow-matching model, which it does not support yet: "
                              "use a DDIM model (e.g. digits, toy2d)")
        if run.model.make_field_net is None:
            raise ConfigError(f"method '{self.name}' needs a potential network, but model '{run.cfg.model}' has no "
                              "make_field_net: add one to the model")
        torch.manual_seed(seed_for(run.cfg.seed, "potential-init"))
        self.potential = Potential(run.model).to(run.device)
        self.net = run.model.make_field_net().to(run.device) if args.estimator == "learned" else None
        base = run.sampler
        self.correction = DoobCorrection(self.potential, base.predict, args.estimator, particles=args.particles,
                                         steps=args.continuation_steps, data_var=args.data_var, net=self.net)
        self.sampler = base.replace(correction=self.correction)
        self.beta_prime = args.beta_prime or args.beta
        self.pool = {"x": None, "prompt": None, "reward": None}  # reward objective: samples of past iterates
        self.ref = {"x": None, "prompt": None}  # learned correction: reference samples
        self.data = None  # dpo / kto feedback

    def modules(self):
        mods = {"potential": Trainable(self.potential)}
        if self.net is not None:
            mods["correction"] = Trainable(self.net, lr=self.args.correction_lr, weight_decay=0.0)
        return mods

    def start(self):
        from ..data import latents

        a, m = self.args, self.run.model
        if a.objective != "reward" and not a.data:  # checked here, not in validate: the bench fills it in later
            kind = "pairs" if a.objective == "dpo" else "labels (or pairs)"
            raise ConfigError(f"objective '{a.objective}' learns from feedback: set 'args.data' to a {kind} JSONL "
                              f"(make one with `diffalign data {kind.split()[0]}`)")
        if a.objective == "dpo":
            ps, x_w, x_l = latents.pairs(m, a.data)
            self.data = {"x_w": x_w, "x_l": x_l, "prompt": self._prompt_ids(ps.prompts)}
        elif a.objective == "kto":
            ls, x = latents.labels(m, a.data)
            self.data = {"x": x, "desirable": ls.desirable, "prompt": self._prompt_ids(ls.prompts)}

    def _prompt_ids(self, prompts) -> torch.Tensor:
        unknown = sorted(set(prompts) - set(self.run.prompts))
        if unknown:
            raise ConfigError(f"the feedback set's prompts {unknown[:3]} are not among the run's prompts: list them in "
                              "the config's `prompts:`")
        return torch.tensor([self.run.prompts.index(p) for p in prompts])

    def _cond(self, ids: torch.Tensor):
        return self.run.model.encode_prompts([self.run.prompts[i] for i in ids.tolist()])

    # ---- potential values ---------------------------------------------------------------
    @torch.no_grad()
    def f(self, x: torch.Tensor, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        out = torch.cat([self.potential(x[i:i + chunk], self._cond(ids[i:i + chunk])) for i in range(0, len(x), chunk)])
        if not torch.isfinite(out).all():
            raise FloatingPointError("the DDO potential returned NaN/inf: the regression diverged (lower optim.lr)")
        return out.double()

    # ---- one iteration ------------------------------------------------------------------------
    def collect(self, epoch: int):
        a, k = self.args, epoch + 1
        self.correction.reset_stats()  # report the particles of this iteration's sampling only
        if a.estimator == "learned" and self.ref["x"] is None:
            self.ref = self._draw(a.reference_samples, "ddo-ref", plain=True)
        if a.objective == "reward":
            x, ids, dl, metrics = self._reward_points(epoch)
        else:
            x, ids, dl, metrics = self._feedback_points()
        g = self.run.generator("ddo-fit", epoch)
        pick = torch.randperm(len(x), generator=g)[: a.fit_size]
        fx = self.f(x[pick], ids[pick])
        target = da.da_target(fx, dl[pick], k, a.option, a.beta, self.beta_prime)
        if a.center_targets:  # exact: every later target is shifted by the same constant, which q ignores
            target = target - target.mean()
        metrics.update(first_variation_mean=float(dl.mean()), target_mean=float(target.mean()),
                       potential_mean=float(fx.mean()), pool=len(x), **self.correction.stats)
        self.correction.reset_stats()
        return Fit(x[pick], self._cond(ids[pick]), target.float(), epoch), metrics

    def _draw(self, n: int, purpose: str, epoch: int = 0, plain: bool = False) -> dict:
        """n samples (gathered from every process's share) of q_k, or of p_ref with `plain`."""
        run = self.run
        prompts = run.draw_prompts(purpose, epoch, n=n)
        local = run.own(prompts)
        sampler = run.sampler if plain else self.sampler
        traj = sampler.sample(run.model, local, generator=run.sample_generators(purpose, epoch, n_global=n),
                              with_logprob=False)
        return {"x": run.gather(traj.final), "prompt": torch.tensor([run.prompts.index(p) for p in prompts]),
                "local": local, "local_x": traj.final}

    def _reward_points(self, epoch: int):
        run, a = self.run, self.args
        parts = []
        for b in range(run.cfg.train.batches_per_epoch):
            d = self._draw(run.cfg.train.batch_size, "ddo-sample", epoch * 1000 + b)
            r = run.gather(run.score(run.model.decode(d["local_x"]), d["local"]).to(run.device))
            if not torch.isfinite(r).all():
                raise FloatingPointError("the reward returned NaN/inf for samples of the current iterate")
            parts.append((d["x"], d["prompt"], r.cpu()))
        new = {"x": torch.cat([p[0] for p in parts]), "prompt": torch.cat([p[1] for p in parts]),
               "reward": torch.cat([p[2] for p in parts])}
        for key, v in new.items():
            old = self.pool[key]
            self.pool[key] = (v if old is None else torch.cat([old.to(v.device), v]))[-a.pool_size:]
        r = self.pool["reward"].double()
        return (self.pool["x"], self.pool["prompt"], da.clip(-r, a.clip),
                {"reward_mean": float(new["reward"].mean()), "reward_std": float(new["reward"].std())})

    def _feedback_points(self):
        a, d = self.args, self.data
        if a.objective == "dpo":
            x = torch.cat([d["x_w"], d["x_l"]])
            ids = torch.cat([d["prompt"], d["prompt"]])
            f, log_z, h = self._log_ratios(x, ids)
            n = len(d["x_w"])
            gw, gl = da.dpo_first_variation(h[:n], h[n:], a.gamma)
            dl = torch.cat([gw, gl]).clamp(-a.clip, a.clip)
            acc = float((h[:n] > h[n:]).double().mean())
            return x, ids, dl, {"implicit_accuracy": acc, "log_z": float(log_z)}
        x, ids = d["x"], d["prompt"]
        f, log_z, h = self._log_ratios(x, ids)
        z = float((torch.softmax(-f, 0) * h).sum())  # KL(q‖p_ref) = E_ref[(q/p_ref)·h]
        dl = da.kto_first_variation(h, d["desirable"].to(h.device), a.gamma, z, a.lambda_d,
                                    a.lambda_u).clamp(-a.clip, a.clip)
        return x, ids, dl, {"kl_ref_point": z, "log_z": float(log_z)}

    def _log_ratios(self, x, ids):
        """(f, log Z, h = log q/p_ref) at the feedback set's images, which are reference samples:
        Z = E_ref[exp(−f)] is their mean of exp(−f)."""
        f = self.f(x, ids)
        log_z = torch.logsumexp(-f, 0) - math.log(len(f))
        return f, log_z, da.log_ratio(f, log_z)

    def micro_steps(self, batch: Fit):
        a, n = self.args, len(batch.target)
        for e in range(a.fit_epochs):
            order = torch.randperm(n, generator=self.run.generator("ddo-perm", batch.epoch, e))
            for rows in order.split(a.fit_batch):
                yield Micro(self._fit_loss(batch, rows.to(batch.x.device)))
        if self.net is not None:
            # the potential's steps are done when the generator gets here: weights by f_{k+1}, once
            f = self.f(self.ref["x"], self.ref["prompt"])
            weights = torch.softmax(-f, 0) * len(f)  # exp(−f) normalised to mean 1 over the pool
            for s in range(a.correction_steps):
                yield Micro(self._correction_loss(batch.epoch, s, weights))

    def _fit_loss(self, batch: Fit, rows):
        def compute():
            cond = None if batch.cond is None else batch.cond[rows]
            pred = self.potential(batch.x[rows], cond)
            loss = (pred - batch.target[rows].to(pred.dtype)).pow(2).mean()
            return loss, {"loss": loss.detach()}

        return compute

    def _correction_loss(self, epoch: int, step: int, weights: torch.Tensor):
        def compute():
            g = self.run.generator("ddo-corr", epoch, step)
            x, ids = self.ref["x"], self.ref["prompt"]
            rows = torch.randperm(len(x), generator=g)[: self.args.correction_batch]
            loss = learned_correction_loss(self.run.model, self.net, x[rows.to(x.device)], self._cond(ids[rows]),
                                           weights[rows.to(weights.device)].float(),
                                           self.sampler.timesteps(self.run.model).cpu(), generator=g,
                                           predict=self.run.sampler.predict)
            return loss, {"correction_loss": loss.detach()}

        return compute

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {}
        for prefix, d in (("pool", self.pool), ("ref", self.ref)):
            for key in ("x", "prompt", "reward"):
                if d.get(key) is not None:
                    state[f"{prefix}_{key}"] = d[key].contiguous()
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, v in state.items():
            prefix, key = name.split("_", 1)
            (self.pool if prefix == "pool" else self.ref)[key] = torch.as_tensor(v).to(
                self.run.device if key == "x" else "cpu")


@dataclass
class _DPOConfig(DDO.Config):
    objective: str = "dpo"


@dataclass
class _KTOConfig(DDO.Config):
    objective: str = "kto"


# The feedback objectives as their own names: they learn from a file (the bench builds it) and query no reward.
register_variant(DDO, name="ddo-dpo", Config=_DPOConfig, offline_data="pairs",
                 description="DDO with the DPO objective on densities, from a pairs JSONL (Kawata et al. 2025)")
register_variant(DDO, name="ddo-kto", Config=_KTOConfig, offline_data="labels",
                 description="DDO with the KTO objective on densities, from a labels JSONL (Kawata et al. 2025)")
