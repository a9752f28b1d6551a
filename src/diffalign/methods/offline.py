"""Offline preference methods: Diffusion-DPO (pairs) and Diffusion-KTO (binary labels).

METHODS.md §5 and §6. Both train on a fixed feedback set (`args.data`, see
`diffalign.data.feedback`), query no reward during training (reward_queries stays
0; evaluation still uses the run's reward) and compare the policy with the frozen
base through `trainer.reference()`.

Shared decisions:
- Denoising error e = mean over elements of ||ε − ε_θ(x_t, t, c)||², x_t from the
  scheduler's `add_noise`, t uniform over the training timesteps [0, T).
- The condition is always the prompt's (no label dropout to the null class), so
  the offline methods align the conditional model; evaluate with guidance 1.0 or
  expect CFG to dilute the change.
- Each of `train.batches_per_epoch` batches of `train.batch_size` items is one
  optimizer step. Items, timesteps and noise are drawn globally from generators
  seeded by (seed, method, epoch, batch) and then sliced per process, so a run is
  the same for any number of processes.
- The set is loaded and validated in `__init__`, before the run folder is written.

Diffusion-DPO: per pair one ε and one t shared by winner and loser;
    L = −log σ(−β/2 · [(e_w^θ − e_l^θ) − (e_w^ref − e_l^ref)])
  logs `implicit_acc`, the fraction of pairs whose argument is positive.

Diffusion-KTO: per sample w = +1 (desirable) / −1 (undesirable), g = e_ref − e_θ
  at a random t with fresh noise, z = max(0, mean_batch g) detached;
    utility "sigmoid" (Kahneman–Tversky, the paper's):  L = λ_w · (1 − σ(w·β·(g − z)))
    utility "loss-averse" (our decision, not the paper's exact form):
                                                        L = −λ_w · log σ(w·β·(g − z))
      i.e. the log-sigmoid: it saturates for gains but keeps growing (linearly) for
      losses, so samples on the wrong side of the reference point are never ignored.
  The batch is drawn desirable with probability γ (default 0.8) per item, uniformly
  within the chosen class. A pairs file is accepted too: it is turned into labels
  by the Pick-a-Pic rule (`labels_from_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import feedback
from ..seeding import seed_for
from . import Micro, register


# ---- the losses (pure functions, tested by hand-worked values) -----------------------
def denoising_error(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch elements."""
    return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(1)


def dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta: float):
    """Diffusion-DPO loss (mean over pairs) and diagnostics."""
    arg = -0.5 * beta * ((e_w - e_l) - (e_w_ref - e_l_ref))
    loss = -F.logsigmoid(arg).mean()
    info = {"implicit_acc": (arg > 0).float().mean().detach(), "dpo_arg": arg.mean().detach(),
            "e_w": e_w.mean().detach(), "e_l": e_l.mean().detach()}
    return loss, info


def kto_loss(e_theta, e_ref, desirable, beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0,
             utility: str = "sigmoid"):
    """Diffusion-KTO loss (mean over samples) and diagnostics; `desirable` is a bool tensor."""
    g = e_ref - e_theta
    z = g.mean().clamp(min=0).detach()
    w = desirable.float() * 2 - 1
    lam = torch.where(desirable, torch.as_tensor(lambda_d, dtype=g.dtype), torch.as_tensor(lambda_u, dtype=g.dtype))
    x = w * beta * (g - z)
    if utility == "sigmoid":
        per = lam * (1 - torch.sigmoid(x))
    elif utility == "loss-averse":
        per = -lam * F.logsigmoid(x)
    else:
        raise ValueError(f"unknown KTO utility {utility!r}: use 'sigmoid' or 'loss-averse'")
    info = {"kl_ref_point": z, "g_mean": g.mean().detach(),
            "desirable_frac": desirable.float().mean().detach()}
    return per.mean(), info


# ---- shared machinery ----------------------------------------------------------------
class _Offline:
    offline_data = True  # learns from a fixed feedback file (args.data) and queries no reward while training
    requires_logprob = False
    requires_reference = True
    requires_differentiable_reward = False

    def _init_common(self, trainer, args):
        self.t, self.args = trainer, args
        if not args.data:
            raise ConfigError(
                f"method '{self.name}' needs a feedback set: set config key 'args.data' to a JSONL file "
                "(build one with `diffalign data pairs ...`)"
            )
        if args.beta <= 0:
            raise ConfigError("config key 'args.beta' must be > 0")
        T = trainer.model.scheduler.config.num_train_timesteps
        self.t_range = (int(args.t_min * T), int(args.t_max * T))
        if not 0 <= self.t_range[0] < self.t_range[1] <= T:
            raise ConfigError("config keys 'args.t_min' < 'args.t_max' must lie in [0, 1]")

    def _encode(self, imgs):
        return feedback.encode_images(self.t.model, imgs.to(self.t.device)).detach()

    def _noise(self, x0, g, n_global):
        """Global timesteps and noise drawn from `g`, sliced for this process."""
        sl = self.t.local_slice(n_global)
        ts = torch.randint(*self.t_range, (n_global,), generator=g)[sl].to(self.t.device)
        eps = torch.randn((n_global, *x0.shape[1:]), generator=g)[sl].to(self.t.device)
        return ts, eps

    def _errors(self, model, x_t, ts, eps, cond):
        return denoising_error(model.predict_noise(x_t, ts, cond), eps)

    def _ref_errors(self, x_t, ts, eps, cond):
        with torch.no_grad(), self.t.reference():
            return self._errors(self.t.model, x_t, ts, eps, cond)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register
class DiffusionDPO(_Offline):
    name = "diffusion-dpo"
    description = "Diffusion-DPO: offline pairwise preferences vs the frozen base, shared noise per pair (Wallace et al. 2024)"
    defaults = {"optim.lr": 1e-3}

    @dataclass
    class Config:
        data: str = ""  # pairs JSONL (diffalign data pairs); validated when the method starts
        beta: float = 2000.0  # paper: 2000-5000 at the per-element-mean error scale
        t_min: float = 0.0  # timesteps drawn uniformly from [t_min*T, t_max*T)
        t_max: float = 1.0

        def validate(self, where):
            if self.beta <= 0:
                raise ValueError(f"config key '{where}.beta' must be > 0")

    def __init__(self, trainer, args: Config):
        self._init_common(trainer, args)
        ps = feedback.load_pairs(args.data)
        self.n, self.ties_dropped = len(ps), ps.ties_dropped
        self.x_w, self.x_l = self._encode(ps.winners), self._encode(ps.losers)
        self.prompts = ps.prompts

    def collect(self, epoch: int):
        t, cfg = self.t, self.t.cfg
        n = cfg.train.batch_size
        batches = []
        for b in range(cfg.train.batches_per_epoch):
            g = torch.Generator().manual_seed(seed_for(cfg.seed, self.name, epoch, b))
            idx = torch.randint(self.n, (n,), generator=g)
            ts, eps = self._noise(self.x_w, g, n)
            idx = idx[t.local_slice(n)]
            dev_idx = idx.to(t.device)
            prompts = [self.prompts[i] for i in idx.tolist()]
            cond = t.model.encode_prompts(prompts)
            xw = t.model.scheduler.add_noise(self.x_w[dev_idx], eps, ts)
            xl = t.model.scheduler.add_noise(self.x_l[dev_idx], eps, ts)
            ref_w = self._ref_errors(xw, ts, eps, cond)
            ref_l = self._ref_errors(xl, ts, eps, cond)
            batches.append({"xw": xw, "xl": xl, "ts": ts, "eps": eps, "cond": cond, "ref_w": ref_w, "ref_l": ref_l})
        return {"batches": batches}, {"pairs": float(self.n), "ties_dropped": float(self.ties_dropped)}

    def micro_steps(self, data):
        for b in data["batches"]:
            yield Micro(self._loss_fn(b))

    def _loss_fn(self, b):
        def compute():
            pol = self.t.policy
            # one forward for winner and loser (same t, same noise)
            e = self._errors(pol, torch.cat([b["xw"], b["xl"]]), torch.cat([b["ts"], b["ts"]]),
                             torch.cat([b["eps"], b["eps"]]), torch.cat([b["cond"], b["cond"]]))
            e_w, e_l = e.chunk(2)
            loss, info = dpo_loss(e_w, e_l, b["ref_w"], b["ref_l"], self.args.beta)
            return loss, {"loss": loss.detach(), **info}

        return compute


@register
class DiffusionKTO(_Offline):
    name = "diffusion-kto"
    description = "Diffusion-KTO: offline per-sample desirable/undesirable labels, Kahneman-Tversky utility (Li et al. 2024)"
    defaults = {"optim.lr": 1e-3}

    @dataclass
    class Config:
        data: str = ""  # labels JSONL (diffalign data labels), or a pairs JSONL (Pick-a-Pic rule applied)
        beta: float = 5000.0  # paper value (SD1.5)
        lambda_d: float = 1.0  # weight of desirable samples
        lambda_u: float = 1.0  # weight of undesirable samples
        gamma: float = 0.8  # probability that a batch item is drawn from the desirable samples
        utility: str = "sigmoid"  # "sigmoid" (Kahneman-Tversky) or "loss-averse" (log-sigmoid; see module doc)
        t_min: float = 0.0
        t_max: float = 1.0

        def validate(self, where):
            if self.utility not in ("sigmoid", "loss-averse"):
                raise ValueError(f"config key '{where}.utility' must be 'sigmoid' or 'loss-averse'")
            if not 0 <= self.gamma <= 1:
                raise ValueError(f"config key '{where}.gamma' must be in [0, 1]")
            if self.beta <= 0 or self.lambda_d < 0 or self.lambda_u < 0:
                raise ValueError(f"config keys '{where}.beta' (> 0), 'lambda_d', 'lambda_u' (>= 0) out of range")

    def __init__(self, trainer, args: Config):
        self._init_common(trainer, args)
        ls = feedback.load_feedback(args.data)
        if isinstance(ls, feedback.PairSet):
            ls = labels_set_from_pairs(ls)
        self.prompts, self.labels = ls.prompts, ls.desirable
        self.x = self._encode(ls.images)
        self.pools = (torch.nonzero(~ls.desirable).flatten(), torch.nonzero(ls.desirable).flatten())
        self.counts = ls.counts
        for k, pool in zip(("undesirable", "desirable"), self.pools):
            wanted = args.gamma if k == "desirable" else 1 - args.gamma
            if len(pool) == 0 and wanted > 0:
                raise ValueError(f"{args.data}: no {k} samples, but args.gamma = {args.gamma} asks for them")

    def collect(self, epoch: int):
        t, cfg = self.t, self.t.cfg
        n = cfg.train.batch_size
        batches = []
        for b in range(cfg.train.batches_per_epoch):
            g = torch.Generator().manual_seed(seed_for(cfg.seed, self.name, epoch, b))
            want_d = torch.rand(n, generator=g) < self.args.gamma
            u = torch.rand(n, generator=g)
            idx = torch.empty(n, dtype=torch.long)
            for d in (False, True):
                pool = self.pools[int(d)]
                m = want_d == d
                if m.any():
                    idx[m] = pool[(u[m] * len(pool)).long().clamp(max=len(pool) - 1)]
            ts, eps = self._noise(self.x, g, n)
            idx = idx[t.local_slice(n)]
            dev_idx = idx.to(t.device)
            cond = t.model.encode_prompts([self.prompts[i] for i in idx.tolist()])
            x_t = t.model.scheduler.add_noise(self.x[dev_idx], eps, ts)
            ref = self._ref_errors(x_t, ts, eps, cond)
            batches.append({"x_t": x_t, "ts": ts, "eps": eps, "cond": cond, "ref": ref,
                            "desirable": self.labels[idx].to(t.device)})
        metrics = {"desirable": float(self.counts["desirable"]), "undesirable": float(self.counts["undesirable"])}
        return {"batches": batches}, metrics

    def micro_steps(self, data):
        for b in data["batches"]:
            yield Micro(self._loss_fn(b))

    def _loss_fn(self, b):
        def compute():
            e = self._errors(self.t.policy, b["x_t"], b["ts"], b["eps"], b["cond"])
            a = self.args
            loss, info = kto_loss(e, b["ref"], b["desirable"], a.beta, a.lambda_d, a.lambda_u, a.utility)
            return loss, {"loss": loss.detach(), **info}

        return compute


def labels_set_from_pairs(ps: "feedback.PairSet") -> "feedback.LabelSet":
    """In memory: the Pick-a-Pic rule (preferred at least once = desirable) on a loaded PairSet."""
    imgs: dict[str, tuple[str, torch.Tensor]] = {}
    wins = set()
    for i, (wp, lp) in enumerate(zip(ps.winner_paths, ps.loser_paths)):
        imgs.setdefault(wp, (ps.prompts[i], ps.winners[i]))
        imgs.setdefault(lp, (ps.prompts[i], ps.losers[i]))
        wins.add(wp)
    keys = list(imgs)
    return feedback.LabelSet([imgs[k][0] for k in keys], torch.stack([imgs[k][1] for k in keys]),
                             torch.tensor([k in wins for k in keys], dtype=torch.bool), ps.path)
