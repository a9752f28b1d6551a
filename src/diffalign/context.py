"""The run context: what methods, training and evaluation share.

`Run(cfg)` builds, from a validated config: the accelerator (devices, processes, mixed
precision), the rewards, the base model with its LoRA adapters (or a frozen copy for
full fine-tuning), the training prompts and the plain `Sampler`. It also holds the
helpers every method uses: seeded generators, prompt draws, `score` (counts reward
queries), `gather`, `reference()` and `minibatches` (global minibatches over processes).

Evaluation imports this module and never the training loop.

Seeding: every random draw comes from a generator seeded by (run seed, purpose, epoch,
..., sample index), so runs reproduce exactly, resume needs no saved RNG state, and
samples are the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from . import adapters
from .config import ConfigError, RunConfig
from .data.prompts import resolve_prompts
from .models import load_model
from .processes import Processes
from .rewards import build_reward
from .sampler import Sampler
from .seeding import generators, seed_for


def use_cpu(device: str | None) -> bool:
    """CPU when asked, or when no accelerator exists (accelerate then runs several CPU processes with gloo)."""
    if device is not None:
        return device == "cpu"
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or has_xpu or torch.backends.mps.is_available())


@dataclass
class Slot:
    """One rollout batch of an epoch, as this process holds it."""

    index: int  # the batch's index in the epoch
    prompts: list[str]  # the global batch's prompts (the same on every process)
    local: list[str]  # this process's prompts
    positions: torch.Tensor  # (B,) positions of this process's rows in the global batch (CPU)
    generators: list[torch.Generator]  # one per local sample, seeded by (run seed, purpose, epoch, index, position)

    @property
    def keys(self) -> torch.Tensor:
        """Global sample ids of this process's rows over the epoch, batch-major: index · n + position."""
        return self.index * len(self.prompts) + self.positions


class Run:
    """Accelerator, rewards, model (+ adapters), prompts, sampler, and the shared helpers."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator | None = None, out: str | Path | None = None,
                 keep_reference: bool = False, differentiable_reward: bool = False):
        """`keep_reference`: with full fine-tuning, keep a frozen copy of the base as the reference
        (LoRA runs always have one: the base with adapters off). `differentiable_reward`: refuse
        a reward without gradients (checked before any model is loaded)."""
        self.cfg, self.out = cfg, None if out is None else Path(out)
        self.acc = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=use_cpu(cfg.device))
        self.dist = Processes(self.acc)
        self.processes, self.rank = self.dist.count, self.dist.index
        self.dist.check_divisible(cfg.train.batch_size, "train.batch_size")
        self.local_batch = cfg.train.batch_size // self.processes
        self.gather, self.gather_any, self.own = self.dist.gather, self.dist.gather_any, self.dist.own
        self.minibatches = self.dist.minibatches
        self.device = self.acc.device

        # rewards first: a bad reward spec fails before any model is pretrained
        self.reward = build_reward(cfg.reward, device=str(self.device))
        if differentiable_reward and not self.reward.differentiable:
            raise ConfigError(f"method '{cfg.method}' needs a differentiable reward, but '{self.reward.name}' is not "
                              "(choose one marked differentiable in `diffalign rewards`)")
        self.eval_reward = build_reward(cfg.eval.reward, device=str(self.device)) if cfg.eval.reward else None
        with self.acc.main_process_first():  # main pretrains/caches, the others then load
            try:
                self.model = load_model(cfg.model, progress=self.acc.is_main_process,
                                        resolution=cfg.pipeline.resolution, negative_prompt=cfg.pipeline.negative_prompt,
                                        scheduler=cfg.pipeline.scheduler or None)
            except ValueError as e:
                raise ConfigError(f"config key 'model': {e}") from e
        self.model.to(self.device)
        from .eval.spaces import configure as configure_eval  # eval.features / eval.real
        configure_eval(self.model, cfg.eval)
        self._frozen_parts_dtype()
        try:
            self.prompts = resolve_prompts(cfg.prompts, self.model.prompts)
        except ValueError as e:
            raise ConfigError(f"config key 'prompts': {e}") from e
        for p in self.prompts:
            self.model.encode_prompts([p])  # a bad prompt fails now, with the model's message
        self.sampler = Sampler.from_config(cfg.sampling, self.model)

        den = self.model.denoiser
        self.lora_config, self.ref_denoiser = None, None
        torch.manual_seed(seed_for(cfg.seed, "init"))  # adapter init is part of the run's seed
        if cfg.lora.enabled:
            self.lora_config = adapters.add_lora(den, cfg.lora.targets or self.model.lora_targets, cfg.lora.rank,
                                                 cfg.lora.alpha)
        else:
            den.requires_grad_(True)
            if keep_reference:  # full fine-tuning keeps a frozen copy
                self.ref_denoiser = copy.deepcopy(den).requires_grad_(False).eval()
        if cfg.train.gradient_checkpointing:
            if not getattr(den, "_supports_gradient_checkpointing", False):
                raise ConfigError(f"config key 'train.gradient_checkpointing': the denoiser of '{cfg.model}' "
                                  f"({type(den).__name__}) does not support it; set it to false")
            den.enable_gradient_checkpointing()
        self.reward_queries = 0

    def _frozen_parts_dtype(self) -> None:
        """With fp16/bf16 mixed precision on an accelerator, the frozen parts (VAE, text encoder)
        are stored in that dtype, as diffusers' training scripts do; the trained weights stay fp32."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.train.mixed_precision)
        if dtype is not None and self.device.type != "cpu":
            for part in self.model.parts.values():
                part.to(dtype=dtype)

    # ---- seeding and data ----------------------------------------------------------------
    def generator(self, *parts) -> torch.Generator:
        """A CPU generator seeded by (run seed, *parts): the same on every process."""
        return torch.Generator().manual_seed(seed_for(self.cfg.seed, *parts))

    def draw_prompts(self, *parts, n: int) -> list[str]:
        """n prompts drawn uniformly (with replacement) from the training prompts."""
        idx = torch.randint(len(self.prompts), (n,), generator=self.generator("prompts", *parts)).tolist()
        return [self.prompts[i] for i in idx]

    def sample_generators(self, *parts, n_global: int) -> list[torch.Generator]:
        """One generator per sample of this process's rows, seeded by (run seed, *parts, global position)."""
        return generators(self.device, self.cfg.seed, *parts, indices=self.dist.positions(n_global).tolist())

    def slots(self, epoch: int, purpose: str, draw=None) -> list[Slot]:
        """The epoch's rollout batches: `draw(b)` gives batch b's global prompts (default: train.batch_size
        prompts drawn by (epoch, b)); each sample's generator is seeded by (purpose, epoch, b, position)."""
        n = self.cfg.train.batch_size
        out = []
        for b in range(self.cfg.train.batches_per_epoch):
            prompts = draw(b) if draw else self.draw_prompts(epoch, b, n=n)
            out.append(Slot(b, prompts, self.own(prompts), self.dist.positions(len(prompts)),
                            self.sample_generators(purpose, epoch, b, n_global=len(prompts))))
        return out

    def score(self, images, prompts, metadata=None) -> torch.Tensor:
        """Training reward on this process's samples; counts reward queries (all processes)."""
        rewards, _ = self.reward(images, prompts, metadata)
        self.reward_queries += len(prompts) * self.processes
        return rewards.float()

    # ---- the reference model -------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        """LoRA (the adapter-free base) or a frozen copy; full fine-tuning by a method that
        needs no reference keeps none (no second copy of the weights)."""
        return self.ref_denoiser is not None or self.lora_config is not None

    @contextlib.contextmanager
    def reference(self):
        """Inside, `self.model` computes the frozen base model."""
        if self.ref_denoiser is not None:
            saved = self.model.denoiser
            self.model.denoiser = self.ref_denoiser
            try:
                yield
            finally:
                self.model.denoiser = saved
        else:
            with adapters.adapters_disabled(self.model.denoiser):
                yield

    def say(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)
