"""Run configuration: YAML -> validated dataclasses.

Every field has a one-line comment. Unknown keys, wrong types and bad values are
errors that name the key (with the closest known key as a suggestion).
`--set a.b=value` overrides are parsed as YAML scalars.

Method-specific options live under `args:` and are validated against the
method's own `Config` dataclass (see `diffalign.methods`).

Nothing here knows a model: `reward` and `eval.reward` left at 'default' become the
defaults the model registered (`diffalign.models.model_defaults`) when the config is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .registry import closest

SOLVERS = ("ddim", "euler", "dpmsolver++", "unipc")  # sampling.scheduler: `diffalign.solvers`
EVAL_SAMPLING = ("num_steps", "eta", "guidance_scale", "scheduler", "order")  # what eval.sampling may override


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


DEFAULT = "default"  # a reward left to the model (see `fill_model_defaults`)


@dataclass
class SamplingConfig:
    num_steps: int = 20  # denoising steps per trajectory
    eta: float = 1.0  # step noise, > 0 for likelihood methods: DDIM eta (1 = DDPM variance); flow models: the SDE's level
    guidance_scale: float | None = None  # classifier-free guidance; None = the model's default
    logprob: str = "sum"  # 'sum' = exact log-likelihood, 'mean' = per-element average (reference-code scale)
    sde: str = "flow-grpo"  # flow models only: noise schedule 'flow-grpo' (eta·sqrt(σ/(1-σ))) or 'dance' (eta)
    scheduler: str | None = None  # a deterministic diffusers solver (ddim, euler, dpmsolver++, unipc); None = the own step
    order: int = 2  # the solver's order (dpmsolver++, unipc: 1-3)

    def validate(self, where: str):
        _check(self.num_steps >= 1, f"{where}.num_steps", "must be >= 1")
        _check(self.eta >= 0, f"{where}.eta", "must be >= 0")
        _check(self.logprob in ("sum", "mean"), f"{where}.logprob", "must be 'sum' or 'mean'")
        _check(self.sde in ("flow-grpo", "dance"), f"{where}.sde", "must be 'flow-grpo' or 'dance'")
        _check(self.scheduler in (None, *SOLVERS), f"{where}.scheduler",
               f"must be null (the model's own step) or one of {', '.join(SOLVERS)}")
        _check(self.order in (1, 2, 3), f"{where}.order", "must be 1, 2 or 3")


@dataclass
class LoraSection:
    enabled: bool = True  # LoRA adapters on the denoiser; False = full fine-tuning
    rank: int = 8  # adapter rank
    alpha: float = 8.0  # adapter scale numerator (scale = alpha / rank)
    targets: list[str] | None = None  # module names to adapt; None = the model's defaults

    def validate(self, where: str):
        _check(self.rank >= 1, f"{where}.rank", "must be >= 1")


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # AdamW learning rate (a method's module may set its own)
    weight_decay: float = 1e-4  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # max gradient norm of each trained module (0 = off)
    schedule: str = "constant"  # learning-rate schedule (diffusers.optimization.get_scheduler), per optimizer step
    warmup_steps: int = 0  # linear warm-up steps of the schedule
    total_steps: int = 0  # optimizer steps a decaying schedule spans; 0 = the whole run (diffalign.schedule)

    def validate(self, where: str):
        _check(self.lr > 0, f"{where}.lr", "must be > 0")
        _check(len(self.betas) == 2, f"{where}.betas", "must be two numbers")
        _check(self.schedule in SCHEDULES, f"{where}.schedule", f"must be one of {', '.join(SCHEDULES)}")
        _check(self.warmup_steps >= 0, f"{where}.warmup_steps", "must be >= 0")
        _check(self.total_steps >= 0, f"{where}.total_steps", "must be >= 0 (0: the schedule spans the run)")
        _check(self.total_steps == 0 or self.total_steps > self.warmup_steps, f"{where}.total_steps",
               "must be above warmup_steps (or 0: the schedule spans the run)")


@dataclass
class TrainConfig:
    epochs: int = 20  # outer epochs: collect data, then update
    batch_size: int = 32  # samples per sampling batch, summed over all processes
    batches_per_epoch: int = 2  # sampling batches per epoch
    mixed_precision: str = "no"  # 'no', 'fp16' or 'bf16' (accelerate)
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_grid_every: int = 0  # epochs between sample grids (0 = start and end only)
    reward_budget: int = 0  # stop before an epoch would take the training reward queries past this (0 = off)
    gradient_checkpointing: bool = False  # recompute the denoiser's activations in backward (less memory, slower)
    sharding: str = "none"  # 'fsdp': shard trained networks over processes with PyTorch FSDP2 (diffalign.sharding)
    cpu_offload: bool = False  # with sharding fsdp: keep sharded parameters, gradients and optimizer state on the CPU
    log_with: str = "tensorboard"  # experiment tracker: tensorboard (RUN/tb), wandb, trackio or mlflow (diffalign.trackers)

    def validate(self, where: str):
        _check(self.epochs >= 1, f"{where}.epochs", "must be >= 1")
        _check(self.reward_budget >= 0, f"{where}.reward_budget", "must be >= 0 (0 = no budget)")
        _check(self.batch_size >= 1, f"{where}.batch_size", "must be >= 1")
        _check(self.batches_per_epoch >= 1, f"{where}.batches_per_epoch", "must be >= 1")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), f"{where}.mixed_precision", "must be no, fp16 or bf16")
        _check(self.checkpoint_every >= 1, f"{where}.checkpoint_every", "must be >= 1")
        _check(self.sharding in ("none", "fsdp"), f"{where}.sharding", "must be 'none' or 'fsdp'")
        _check(not self.cpu_offload or self.sharding == "fsdp", f"{where}.cpu_offload",
               "offloads sharded state: set train.sharding: fsdp as well")
        from .trackers import missing

        why = missing(self.log_with)
        _check(why is None, f"{where}.log_with", why or "")


@dataclass
class EvalConfig:
    reward: str | None = DEFAULT  # held-out evaluation reward; 'default' = the model's, None = the training reward only
    per_prompt: int = 8  # evaluation samples per prompt
    seed: int = 1234  # evaluation seed: base and final use the same noise
    every: int = 0  # epochs between evaluations during training (0 = start and end only)
    beta: float = 1.0  # toy2d: beta of the exact optimum p* ∝ p_ref exp(r / beta) that samples are compared with
    features: str | None = None  # CLIP folder: diversity and Fréchet distance in its image-embedding space (None = the model's own space)
    real: str | None = None  # real images for the Fréchet distance: a data spec (see diffalign.data.datasets), None = the model's own (if any)
    sampling: dict = field(default_factory=dict)  # sampler overrides for every evaluation, base and aligned, e.g. {eta: 0} or {scheduler: dpmsolver++, num_steps: 10}; empty = each method's own

    def validate(self, where: str):
        _check(self.per_prompt >= 2, f"{where}.per_prompt", "must be >= 2 (diversity needs two samples per prompt)")
        _check(self.beta > 0, f"{where}.beta", "must be > 0")
        bad = sorted(set(self.sampling) - set(EVAL_SAMPLING))
        _check(not bad, f"{where}.sampling", f"has unknown keys {bad}: it takes {', '.join(EVAL_SAMPLING)}")
        if self.sampling:
            SamplingConfig(**self.sampling).validate(f"{where}.sampling")


@dataclass
class PipelineConfig:
    resolution: int | None = None  # image side in pixels for pipeline folders; None = the model's default
    negative_prompt: str = ""  # what the unconditional branch of classifier-free guidance encodes
    scheduler: dict = field(default_factory=dict)  # overrides of the folder's scheduler config, e.g. {set_alpha_to_one: false, steps_offset: 1}

    def validate(self, where: str):
        _check(self.resolution is None or self.resolution >= 8, f"{where}.resolution", "must be >= 8 pixels")


@dataclass
class RunConfig:
    method: str = "ddpo"  # registered method name (`diffalign methods`)
    model: str = "digits"  # base model by name (`diffalign models`), or a local diffusers pipeline folder
    reward: Any = DEFAULT  # reward name, 'module:function', or {name: weight}; 'default' = the model's own
    prompts: list[str] | str | None = None  # a list, a prompts file (one per line), or a prompt set name; None = the model's defaults
    seed: int = 0  # run seed: every epoch's randomness derives from (seed, epoch)
    device: str | None = None  # None = accelerate's choice (GPU if available)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    args: dict = field(default_factory=dict)  # method-specific options (validated by the method)

    def __post_init__(self):
        fill_model_defaults(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fill_model_defaults(cfg: RunConfig) -> None:
    """Replace 'default' in `reward` and `eval.reward` by the rewards model `cfg.model` registered; a
    training reward the model does not name is an error (pipeline folders name none)."""
    if DEFAULT not in (cfg.reward, cfg.eval.reward):
        return
    from .models import model_defaults

    reward, eval_reward = model_defaults(cfg.model)
    if cfg.eval.reward == DEFAULT:
        cfg.eval.reward = eval_reward
    if cfg.reward == DEFAULT:
        _check(reward is not None, "reward", f"must be set: model {cfg.model!r} has no default reward "
                                             "(`diffalign rewards` lists them)")
        cfg.reward = reward


def _check(ok: bool, key: str, msg: str):
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`, converting where YAML is ambiguous."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}' got {value!r}; expected {' or '.join(_type_name(o) for o in options)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad types."""
    data = {} if data is None else data
    where = prefix or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = closest(key, names)
            hint = f"; did you mean '{close}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate(prefix or "config")
        except ConfigError:
            raise
        except ValueError as e:  # a section's own check: the same kind of error as a bad key
            raise ConfigError(str(e)) from None
    return obj


def set_dotted(data: dict, dotted: str, value):
    """data['a']['b'] = value for dotted = 'a.b' (creating sections as needed)."""
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set train.epochs=5)")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def load_raw(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> dict:
    """Read a YAML file (or start from `base`) and apply `--set` overrides, unvalidated."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist (examples are in configs/)")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping at the top level")
        data.update(loaded or {})
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Read a YAML file (or start from `base`), apply `--set` overrides, validate."""
    return from_dict(RunConfig, load_raw(path, overrides, base))


def merge_under(defaults: dict, data: dict) -> dict:
    """Dotted-key `defaults` ({'sampling.logprob': 'mean'}) filled in wherever `data` is silent."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in defaults.items():
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node.setdefault(last, value)
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
