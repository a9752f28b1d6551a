"""Method registry and protocol. A method is one file in this package defining a class
decorated with `@register` (or, outside the package, any class named in a config as
`method: mypackage.module:MyMethod`); importing the package finds them all, so adding a
method is one new file plus a config.

A method class subclasses `Method`, which declares the protocol and its defaults, and
provides (`ddpo.py` is a complete example):

- `name`, `description` (one line), `Config` (dataclass of its `args:`, one comment per field);
- `requires_logprob` (eta > 0 needed), `requires_reference` (the frozen base is used),
  `requires_differentiable_reward`; `offline_data` (learns from a file, queries no reward: the
  kind of file it reads, "pairs" or "labels", which the bench builds for it);
  `second_order` (its loss holds a gradient of a trained network, so it cannot be sharded);
- `defaults`: config values it prefers, applied under the user's config (dotted keys);
- `__init__(self, run, args)`: cheap — checks and module construction only. Evaluation
  builds the method too (for its modules and sampler), so heavy work goes in `start`;
- `start(self)` (default: nothing): called once before training, e.g. to load and validate a
  data set; an error here stops the run before anything is written;
- `modules(self) -> dict[str, Trainable]` (default None): the trainable modules by name, each
  with its own learning rate and weight decay (default: `{"denoiser": Trainable(the
  denoiser or its LoRA)}`). The loop moves, optimises, clips and checkpoints each one;
- `sampler` (attribute, default None): the `Sampler` the aligned model samples with (default:
  the run's plain sampler). Evaluation, `diffalign sample` and the benchmark use it;
- `collect(self, epoch) -> (batch, metrics)`: sampling and reward queries, no gradients;
- `micro_steps(self, batch) -> iterable of Micro`: each Micro computes one loss; the loop
  runs backward on it and takes an optimizer step after every `accumulate` of them;
- `on_optimizer_step(self)` (default: nothing): state that changes once per optimizer step
  (constrained's dual variables), never inside a loss that a benchmark may replay;
- `state_dict()` / `load_state_dict(d)` (default: no state): state kept in checkpoints; values may
  be tensors (saved with safetensors) or JSON-able.

A method's file reads top to bottom: the loss math lives in `diffalign.losses`, shared
pieces (pair building, step rewards) are functions; no class hierarchies beyond `Method`.
A method never sees ranks or process counts: `run.slots`, `run.own`, `run.minibatches` and
`Micro(share=, accumulate=)` carry the multi-process bookkeeping (`diffalign.processes`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..processes import Share
from ..registry import did_you_mean, import_all

METHODS: dict[str, type] = {}
_MIXED: dict[type, type] = {}  # a user's class without `Method` -> the class with its defaults


@dataclass
class Micro:
    """One micro-batch loss: `compute()` -> (loss tensor or None, metrics dict of floats).

    `share`: this process's part of the global minibatch; when it holds none, the loop does not
    call `compute` (the process adds a zero gradient to the average over processes).
    `accumulate`: the gradients of this many consecutive micro-batches make one optimizer step; the
    loop divides each loss by it and steps after the last. None from `compute` (or a loss without
    gradient) means nothing to backpropagate."""

    compute: Callable
    share: Share | None = None  # None: every process computes
    accumulate: int = 1


@dataclass
class Trainable:
    """A module the loop trains: its parameters with requires_grad are optimised."""

    module: nn.Module
    lr: float | None = None  # None: optim.lr
    weight_decay: float | None = None  # None: optim.weight_decay
    grad_clip: float | None = None  # max gradient norm of this module; None: optim.grad_clip (0 = off)


class Method:
    """The protocol every method follows, with its defaults: a method subclasses it and sets only what
    differs (a user's class named as 'module:Class' gets these defaults mixed in)."""

    name: str = ""
    description: str = ""
    requires_logprob = False  # every trained step needs a log-probability (eta > 0)
    requires_reference = False  # the frozen base is used (full fine-tuning then keeps a copy)
    requires_differentiable_reward = False
    offline_data = False  # "pairs" or "labels": learns from that file (args.data), queries no reward
    second_order = False  # its loss differentiates through a trained network twice (no FSDP sharding then)
    defaults: dict = {}  # config values the method prefers, under the user's config (dotted keys)
    sampler = None  # the aligned model's `Sampler`; None: the run's plain sampler

    def start(self) -> None:
        """Called once before training (heavy work, e.g. loading a data set)."""

    def modules(self) -> dict[str, Trainable] | None:
        """The trainable modules by name; None: the run's denoiser (or its LoRA) alone."""
        return None

    def on_optimizer_step(self) -> None:
        """Called after every optimizer step (state that changes once per step, e.g. dual variables)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


def register(cls: type) -> type:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def register_variant(cls: type, **attributes) -> type:
    """Register `cls` again under another name with some class attributes changed (e.g. a
    `Config` with other defaults), without writing a subclass by hand."""
    variant = type(attributes["name"].title().replace("-", ""), (cls,), attributes)
    variant.__module__ = cls.__module__
    return register(variant)


def _discover() -> None:
    import_all(__name__, __path__)


def get_method(name: str) -> type:
    """A registered method by name, or a user's class given as 'package.module:Class'."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"method {name!r} cannot be imported ({type(e).__name__}: {e}): give "
                             "'package.module:Class' importable from the current Python path") from e
        missing = [a for a in ("Config", "collect", "micro_steps") if not hasattr(cls, a)]
        if missing:
            raise ValueError(f"method {name!r} lacks {', '.join(missing)}: see the protocol in diffalign.methods")
        if not issubclass(cls, Method):  # the protocol's defaults mixed in, once per class
            cls = _MIXED.setdefault(cls, type(cls.__name__, (cls, Method), {"__module__": cls.__module__}))
        return cls
    _discover()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: registered methods are {', '.join(sorted(METHODS))}."
                         f"{did_you_mean(name, METHODS)}")
    return METHODS[name]


def list_methods() -> list[tuple[str, str]]:
    _discover()
    return [(n, METHODS[n].description) for n in sorted(METHODS)]


def resolve_config(path=None, overrides=None, base: dict | None = None):
    """Load a config, apply the method's defaults under it, validate everything -> (cfg, args)."""
    from ..config import ConfigError, RunConfig, from_dict, load_raw, merge_under

    raw = load_raw(path, overrides, base)
    method_cls = get_method(from_dict(RunConfig, raw).method)  # validates keys and types first
    cfg = from_dict(RunConfig, merge_under(method_cls.defaults, raw))
    args = from_dict(method_cls.Config, cfg.args, "args")
    if method_cls.requires_logprob and cfg.sampling.eta <= 0:
        raise ConfigError(
            f"method '{cfg.method}' needs step log-probabilities, but sampling.eta = {cfg.sampling.eta} makes "
            "every step deterministic: set sampling.eta > 0 (1.0 = DDPM variance)"
        )
    if method_cls.requires_logprob and cfg.sampling.scheduler is not None:
        raise ConfigError(
            f"method '{cfg.method}' needs step log-probabilities, but sampling.scheduler = "
            f"{cfg.sampling.scheduler!r} is a deterministic solver: set sampling.scheduler: null (the model's own "
            "step; the solvers are for methods without likelihoods, e.g. nft, awm, and for eval.sampling)")
    if method_cls.requires_logprob:
        check_stochastic_steps(cfg)
    if method_cls.second_order and cfg.train.sharding == "fsdp":
        raise ConfigError(
            f"method '{cfg.method}' differentiates through the denoiser twice (its loss holds a gradient of the "
            "network's output), and FSDP's sharding hooks do not support double backward: set "
            "train.sharding: none (data parallel: every process holds the whole model)")
    return cfg, args


def check_stochastic_steps(cfg) -> None:
    """A pipeline folder's scheduler must give every step a likelihood (std > 0); refuse it here, before
    anything loads, naming the `pipeline.scheduler` settings that fix it."""
    from ..config import ConfigError
    from ..models import folder_scheduler, is_path
    from ..sampling import deterministic_steps

    if not is_path(cfg.model):
        return
    try:
        scheduler = folder_scheduler(cfg.model, cfg.pipeline.scheduler or None)
    except ValueError as e:  # an override the scheduler does not take
        raise ConfigError(str(e)) from None
    if scheduler is None:
        return
    bad = deterministic_steps(scheduler, cfg.sampling.num_steps, cfg.sampling.eta)
    if not bad:
        return
    settings = {k: scheduler.config.get(k) for k in ("set_alpha_to_one", "steps_offset") if k in scheduler.config}
    shown = ", ".join(f"{k}: {str(v).lower()}" for k, v in settings.items())
    raise ConfigError(
        f"model folder {cfg.model!r}: its scheduler ({type(scheduler).__name__}, {shown}) makes the step(s) at "
        f"timestep {bad} of the {cfg.sampling.num_steps}-step schedule deterministic (std 0), so they have no "
        f"log-probability and method '{cfg.method}' cannot train them. Override the folder's settings in the config "
        "(the folder stays as it is): --set pipeline.scheduler.set_alpha_to_one=false "
        "--set pipeline.scheduler.steps_offset=1 (Stable Diffusion 1.x's own settings), or in YAML "
        "`pipeline: {scheduler: {set_alpha_to_one: false, steps_offset: 1}}`")


def build(run, args):
    """The method of `run.cfg`, built on the run."""
    return get_method(run.cfg.method)(run, args)


def modules_of(method, run) -> dict[str, Trainable]:
    """The method's trainable modules by name (default: the denoiser / its LoRA)."""
    mods = method.modules()
    if mods is not None:
        if "denoiser" in mods and mods["denoiser"].module is not run.model.denoiser:
            raise ValueError("a method's 'denoiser' module must be the run's denoiser (run.model.denoiser)")
        return mods
    return {"denoiser": Trainable(run.model.denoiser)}


def sampler_of(method, run):
    """The sampler of the aligned model: the method's own, or the run's plain one."""
    return method.sampler or run.sampler


def run_needs(name: str) -> dict:
    """What the method asks of its run context (`Run` keyword arguments)."""
    cls = get_method(name)
    return {"keep_reference": cls.requires_reference, "differentiable_reward": cls.requires_differentiable_reward}
