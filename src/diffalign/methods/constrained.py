"""Constrained diffusion via dual training (Khalafi, Ding & Ribeiro, "Constrained Diffusion Models via Dual
Training", NeurIPS 2024;
METHODS.md §9). The math and the resilient variant's factor are in `diffalign.losses.constrained`.

Trains the denoiser itself (full fine-tuning by default; LoRA if the config enables it),
from the pretrained weights (`init: pretrained`) or from a fresh initialisation
(`init: scratch`), to minimise the denoising loss L_0 on the main data set (`args.data`)
subject to L_i ≤ b_i on each constraint set (`args.constraints`).

- A set is a spec of `diffalign.data.datasets` (digits subsets, a PNG folder, an .npz), or
  `samples:N`: N samples of the starting model, drawn once at start (adaptation: the
  constraint keeps the fine-tune close to the model it started from).
- A constraint's loss is `denoising` (the ε-MSE on its set, the paper's), or `distill`:
  ‖ε_θ(x_t) − ε_start(x_t)‖² on its noised images, against a frozen copy of the starting
  model. Both send their gradient into θ (the public notebook's adaptation mode computed
  its constraint with the frozen model only, so it sent none).
- b_i is `bound` (absolute) or `slack` × the starting model's loss on the set, measured
  at start on fixed noise.
- Each of `train.batches_per_epoch` steps is one primal AdamW step on L_0 + Σ μ_i L_i
  (`train.batch_size` main images, `constraint_batch` per constraint; timesteps uniform);
  every `dual_every` steps, μ takes a dual step with L̂_i the mean of the minibatch losses
  since the last one (averaged over processes, so μ is the same everywhere).
- μ, its history (one entry per dual step) and the infeasibility counters are run state:
  checkpointed and resumed. Metrics (metrics.jsonl and TensorBoard) hold per epoch the
  mean L_0, L_i, b_i and μ_i.
- A μ_i that rose at `warn_after` dual steps in a row warns once, naming the constraint
  and its loss against b_i: the bound is probably infeasible.
- `conditional: false` trains every image on the model's null condition: an unconditional
  model sampled with the prompt ''.
- Images, timesteps and noise are drawn globally from generators seeded by (seed, epoch,
  step, set) and sliced per process: a run is the same for any number of processes.
- The reward is never queried in training (reward_queries stays 0); evaluation uses it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .. import adapters
from ..config import ConfigError
from ..data import datasets, latents
from ..losses import denoising_error
from ..losses.constrained import dual_step, lagrangian
from ..seeding import generators, seed_for
from . import Method, Micro, register
from .offline import draw_noise, noised

KINDS = ("denoising", "distill")


class InfeasibleWarning(RuntimeWarning):
    """A constraint's multiplier keeps rising: its bound is probably out of reach."""


@dataclass
class Constraint:
    data: str = ""  # data set spec (diffalign.data.datasets) or 'samples:N' (N samples of the starting model)
    name: str = ""  # label in metrics and warnings ('' = c<index>)
    kind: str = "denoising"  # denoising: ε-MSE on the set; distill: ‖ε_θ − ε_start‖² on its noised images
    bound: float = 0.0  # b_i, absolute (> 0); 0 = use slack
    slack: float = 0.0  # b_i = slack × the starting model's loss on the set (measured at start)

    def validate(self, where):
        if not self.data:
            raise ValueError(f"config key '{where}.data' must name the constraint's data set")
        if self.kind not in KINDS:
            raise ValueError(f"config key '{where}.kind' must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.bound < 0 or self.slack < 0:
            raise ValueError(f"config key '{where}.bound' / '{where}.slack' must be > 0 (b_i ≤ 0 can never hold: "
                             f"a denoising loss is positive)")
        if (self.bound > 0) == (self.slack > 0):
            raise ValueError(f"constraint '{where}': set exactly one of 'bound' (absolute b_i > 0) and 'slack' "
                             "(b_i = slack × the starting model's loss on the set)")


@dataclass
class Set:
    """A data set in the model's sample space, with its conditions."""

    name: str
    x: torch.Tensor  # (N, *sample_shape) on the run's device
    label: torch.Tensor | None  # (N,) index into `conds`, or None (unconditional)
    conds: torch.Tensor | None  # (U, ...) encoded labels
    kind: str = "denoising"


@register
class Constrained(Method):
    name = "constrained"
    description = ("Constrained diffusion: denoising loss on the data subject to losses on constraint sets ≤ b_i, "
                   "by primal-dual training (Khalafi, Ding & Ribeiro 2024)")
    requires_reference = False  # `distill` asks the run for the frozen base (`run.keep_reference`) in __init__
    defaults = {"lora.enabled": False, "optim.lr": 1e-4, "optim.grad_clip": 1.0, "optim.weight_decay": 0.0}

    @dataclass
    class Config:
        data: str = ""  # the main data set (diffalign.data.datasets spec); '' = the model's own (digits, toy2d)
        constraints: list[Constraint] = field(default_factory=list)  # none = plain (unconstrained) training
        conditional: bool = True  # labels condition the model; false: every image trains the null condition
        label_dropout: float = 0.0  # conditional: fraction of labels dropped to the null condition (CFG)
        init: str = "pretrained"  # pretrained: fine-tune the model; scratch: re-initialise it first
        dual_lr: float = 0.1  # η_d (paper: 1000 × the primal lr)
        dual_every: int = 5  # primal steps per dual step (paper: 5)
        dual_start: int = 0  # primal steps before the first dual step (from scratch: early losses are all high)
        resilient_alpha: float = 0.0  # > 0: resilient variant, dual step μ + η_d(L − b − 2αμ) as the paper's code (its α 0.085)
        mu_init: float = 0.0  # starting multipliers
        constraint_batch: int = 64  # images per constraint per step (paper: 64); the main set: train.batch_size
        estimate_size: int = 512  # slack: noised images the starting loss is averaged over (fixed noise)
        warn_after: int = 50  # warn when a multiplier rose at this many dual steps in a row (0 = never)

        def validate(self, where):
            if self.init not in ("pretrained", "scratch"):
                raise ValueError(f"config key '{where}.init' must be 'pretrained' or 'scratch', got {self.init!r}")
            if self.dual_lr <= 0 or self.dual_every < 1 or self.constraint_batch < 1 or self.estimate_size < 1:
                raise ValueError(f"config keys '{where}.dual_lr' must be > 0 and '{where}.dual_every', "
                                 f"'{where}.constraint_batch', '{where}.estimate_size' >= 1")
            if self.resilient_alpha < 0 or self.mu_init < 0 or self.warn_after < 0 or self.dual_start < 0:
                raise ValueError(f"config keys '{where}.resilient_alpha', '{where}.mu_init', '{where}.warn_after', "
                                 f"'{where}.dual_start' must be >= 0")
            if not 0 <= self.label_dropout < 1:
                raise ValueError(f"config key '{where}.label_dropout' must be in [0, 1)")
            names = [c.name or f"c{i}" for i, c in enumerate(self.constraints)]
            if len(set(names)) != len(names):
                raise ValueError(f"config key '{where}.constraints': names must be unique, got {names}")

    def __init__(self, run, args: Config):
        self.run, self.args = run, args
        self.names = [c.name or f"c{i}" for i, c in enumerate(args.constraints)]
        run.dist.check_divisible(args.constraint_batch, "args.constraint_batch")
        if args.init == "scratch":
            if run.lora_config is not None:
                raise ConfigError("args.init = scratch trains every weight: set lora.enabled: false")
            if any(c.kind == "distill" or c.data.startswith("samples:") for c in args.constraints):
                raise ConfigError("constraints on the starting model ('distill', 'samples:N') need args.init = "
                                  "pretrained: a freshly initialised model has nothing to stay close to")
            _reinitialise(run.model.denoiser, seed_for(run.cfg.seed, "scratch-init"))
        if any(c.kind == "distill" for c in args.constraints):
            run.keep_reference()  # the starting model (init: pretrained) is the run's frozen base
        self.mu = torch.full((len(self.names),), float(args.mu_init))
        self.bounds = torch.zeros(len(self.names))
        self.window = torch.zeros(len(self.names))  # sum of constraint losses since the last dual step
        self.window_steps = 0
        self.steps = 0
        self.last_losses: list[torch.Tensor] = []  # the constraint losses of the step in progress
        self.rising = [0] * len(self.names)
        self.warned = [False] * len(self.names)
        self.history: list = []  # per dual step: [primal step, μ..., L̂...]
        self.main = None
        self.sets: list[Set] = []

    # ---- data ------------------------------------------------------------------------
    def start(self):
        """Load every set and measure relative bounds, with the starting model: errors here write nothing."""
        a, run = self.args, self.run
        self.main = self._load(a.data or self._own_data(), "main")
        self.sets = []
        for i, (c, name) in enumerate(zip(a.constraints, self.names)):
            s = self._samples(c.data, name) if c.data.startswith("samples:") else self._load(c.data, name)
            s.kind = c.kind
            self.sets.append(s)
            if c.bound > 0:
                self.bounds[i] = c.bound
            else:
                start_loss = self._starting_loss(s, i)
                self.bounds[i] = c.slack * start_loss
                if not self.bounds[i] > 0:
                    raise ConfigError(f"constraint '{name}': b = slack × the starting loss = {c.slack} × "
                                      f"{start_loss:.3g} ≤ 0 (a '{c.kind}' loss of the starting model on its own "
                                      "samples is 0): give an absolute 'bound' instead")
                run.say(f"constraint '{name}': b = {c.slack} × starting loss {start_loss:.4f} = "
                        f"{float(self.bounds[i]):.4f}")

    def _own_data(self) -> str:
        name = self.run.cfg.model
        if name not in datasets.BUILTIN:
            raise ConfigError(f"model '{name}' has no built-in data set: name the training data in args.data "
                              "(a PNG folder, an .npz file or a digits subset)")
        return name

    @property
    def conditional(self) -> bool:
        """Labels condition the model: asked for, and the model has conditions (toy2d has none)."""
        return self.args.conditional and self.run.model.null_condition(1) is not None

    def _load(self, spec: str, name: str) -> Set:
        try:
            data = datasets.load(spec)
        except datasets.DatasetError as e:
            raise ConfigError(f"{name} data set: {e}") from None
        if self.conditional and data.labels is None:
            raise ConfigError(f"data set {spec!r} ({name}) has no labels, but args.conditional is true: give labelled "
                              "data (subfolders per label, 'labels' in the .npz) or set args.conditional: false")
        x = latents.encode(self.run.model, data.images)
        if x.shape[1:] != tuple(self.run.model.sample_shape):
            raise ConfigError(f"data set {spec!r} ({name}) holds samples of shape {tuple(x.shape[1:])}, model "
                              f"'{self.run.cfg.model}' samples {tuple(self.run.model.sample_shape)}")
        return self._with_labels(name, x, data.labels if self.conditional else None, spec)

    def _with_labels(self, name, x, labels, spec) -> Set:
        if labels is None:
            return Set(name, x, None, None)
        unique = sorted(set(labels))
        try:
            conds = self.run.model.encode_prompts(unique)
        except ValueError as e:
            raise ConfigError(f"data set {spec!r} ({name}) has labels the model '{self.run.cfg.model}' does not know: "
                              f"{e}") from None
        index = {u: j for j, u in enumerate(unique)}
        return Set(name, x, torch.tensor([index[v] for v in labels]), conds)

    @torch.no_grad()
    def _samples(self, spec: str, name: str) -> Set:
        """N samples of the starting model, prompts spread evenly over the model's (or '' unconditional)."""
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"constraint data {spec!r}: write samples:N with N >= 1 (samples of the starting model)")
        run = self.run
        prompts = run.prompts if self.conditional else [""]
        all_prompts = [prompts[i % len(prompts)] for i in range(n)]
        finals = []
        for i in range(0, n, 128):
            gens = generators(run.device, run.cfg.seed, "constrained-samples", name, indices=range(i, min(n, i + 128)))
            traj = run.sampler.sample(run.model, all_prompts[i:i + 128], generator=gens, with_logprob=False)
            finals.append(traj.final.detach())
        return self._with_labels(name, torch.cat(finals), all_prompts if self.conditional else None, spec)

    @torch.no_grad()
    def _starting_loss(self, s: Set, i: int) -> float:
        g = self.run.generator("constrained-bound", i)
        n, T = self.args.estimate_size, self.run.model.scheduler.config.num_train_timesteps
        total = 0.0
        for lo in range(0, n, 256):
            m = min(256, n - lo)
            idx = torch.randint(len(s.x), (m,), generator=g)
            ts = torch.randint(0, T, (m,), generator=g).to(self.run.device)
            eps = torch.randn((m, *s.x.shape[1:]), generator=g).to(self.run.device)
            total += float(self._errors(s, idx.to(self.run.device), ts, eps, None).sum())
        return total / n

    # ---- losses ----------------------------------------------------------------------
    def _cond(self, s: Set, idx: torch.Tensor, drop: torch.Tensor | None):
        model = self.run.model
        if s.label is None:
            return model.null_condition(len(idx))
        cond = s.conds[s.label[idx.cpu()].to(s.conds.device)]
        if drop is not None and drop.any():
            cond = cond.clone()
            cond[drop.to(cond.device)] = model.null_condition(int(drop.sum()))
        return cond

    def _errors(self, s: Set, idx, ts, eps, drop) -> torch.Tensor:
        """Per-image loss of set `s` at images `idx`, timesteps `ts`, noise `eps`."""
        model = self.run.model
        cond = self._cond(s, idx, drop)
        x_t, target = noised(self.run, s.x[idx], eps, ts)
        if s.kind == "distill":
            with torch.no_grad(), self.run.reference():
                target = model.forward(model.denoiser, x_t, ts, cond).detach()
        return denoising_error(model.predict_noise(x_t, ts, cond), target)

    def _minibatch_loss(self, s: Set, n: int, g: torch.Generator) -> torch.Tensor:
        run = self.run
        idx = torch.randint(len(s.x), (n,), generator=g)
        T = run.model.scheduler.config.num_train_timesteps
        ts, eps = draw_noise(run, s.x.shape[1:], (0, T), g, n)
        drop = torch.rand(n, generator=g) < self.args.label_dropout if self.args.label_dropout > 0 else None
        return self._errors(s, run.own(idx).to(run.device), ts, eps, None if drop is None else run.own(drop)).mean()

    # ---- training --------------------------------------------------------------------
    def collect(self, epoch: int):
        if self.main is None:
            raise RuntimeError("method 'constrained': start() must load the data sets before training")
        return epoch, {}

    def micro_steps(self, epoch: int):
        for step in range(self.run.cfg.train.batches_per_epoch):
            yield Micro(self._step_fn(epoch, step))

    def _step_fn(self, epoch: int, step: int):
        def compute():
            run = self.run
            main = self._minibatch_loss(self.main, run.cfg.train.batch_size, run.generator("constrained", epoch, step, 0))
            losses = [self._minibatch_loss(s, self.args.constraint_batch, run.generator("constrained", epoch, step, i + 1))
                      for i, s in enumerate(self.sets)]
            mu_used = self.mu.clone()
            loss = lagrangian(main, losses, mu_used)
            metrics = {"loss": loss.detach(), "loss_main": main.detach()}
            for name, l_i, m, b in zip(self.names, losses, mu_used.tolist(), self.bounds.tolist()):
                metrics.update({f"loss_{name}": l_i.detach(), f"mu_{name}": m, f"bound_{name}": b})
            self.last_losses = [l_i.detach().float().cpu() for l_i in losses]
            return loss, metrics

        return compute

    def on_optimizer_step(self) -> None:
        """After each primal step: add its constraint losses to the window and, every `dual_every`
        steps past `dual_start`, take a dual step (once per optimizer step, whatever replays the loss)."""
        losses, self.last_losses = self.last_losses, []
        if losses:
            self.window += torch.stack(losses)
        self.window_steps += 1
        self.steps += 1
        if losses and self.steps % self.args.dual_every == 0:
            if self.steps > self.args.dual_start:  # before: warm-up, μ stays
                self._dual_update()
            self.window, self.window_steps = torch.zeros_like(self.window), 0

    def _dual_update(self) -> None:
        run, a = self.run, self.args
        estimate = self.window / self.window_steps
        estimate = run.dist.mean(estimate)  # every process's mean over its share: their mean is the global one
        new = dual_step(self.mu, estimate, self.bounds, a.dual_lr, a.resilient_alpha)
        for i, name in enumerate(self.names):
            self.rising[i] = self.rising[i] + 1 if new[i] > self.mu[i] else 0
            if a.warn_after and self.rising[i] >= a.warn_after and not self.warned[i]:
                self.warned[i] = True
                msg = (f"constraint '{name}' looks infeasible: its multiplier rose at each of the last {self.rising[i]} "
                       f"dual steps (μ = {float(new[i]):.3g}) and its loss {float(estimate[i]):.4f} stays above "
                       f"b = {float(self.bounds[i]):.4f}. Loosen its bound or slack, or use the resilient variant "
                       "(args.resilient_alpha > 0)")
                warnings.warn(msg, InfeasibleWarning, stacklevel=1)
        self.mu = new
        self.history.append([self.steps, *[round(float(v), 6) for v in new], *[round(float(v), 6) for v in estimate]])

    # ---- run state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mu": self.mu.clone(), "window": self.window.clone(), "bounds": self.bounds.clone(),
                "counters": {"steps": self.steps, "window_steps": self.window_steps, "rising": self.rising,
                             "warned": self.warned, "history": self.history, "names": self.names}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        counters = state["counters"]
        if counters["names"] != self.names:
            raise ConfigError(f"the checkpoint's constraints {counters['names']} are not the config's {self.names}")
        self.mu = torch.as_tensor(state["mu"]).float().cpu()
        self.window = torch.as_tensor(state["window"]).float().cpu()
        self.bounds = torch.as_tensor(state["bounds"]).float().cpu()
        self.steps, self.window_steps = counters["steps"], counters["window_steps"]
        self.rising, self.warned, self.history = counters["rising"], counters["warned"], counters["history"]


def _reinitialise(denoiser, seed: int) -> None:
    """Fresh weights for a diffusers model, in place (the run keeps the same module)."""
    den = adapters.unwrap(denoiser)
    if not hasattr(type(den), "from_config"):
        raise ConfigError(f"args.init = scratch needs a diffusers model (from_config); {type(den).__name__} is not one")
    torch.manual_seed(seed)
    fresh = type(den).from_config(den.config)
    den.load_state_dict(fresh.state_dict())
