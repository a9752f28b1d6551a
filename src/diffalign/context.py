"""The run context: what methods, training and evaluation share.

`Run(cfg)` builds, from a validated config: the accelerator (devices, processes, mixed
precision), the rewards, the base model with its LoRA adapters (or a frozen copy for
full fine-tuning), the training prompts and the plain `Sampler`. Its parts can be built
alone (tests do): `dist` (`processes.Processes`: gather, this process's rows, global
minibatches), `seeds` (`seeding.Seeds`: seeded generators, prompt draws, rollout slots) and
`meter` (`RewardMeter`: the training reward and its query counter); the run offers their
calls directly, with `reference()` (the frozen base) beside them.

Evaluation imports this module and never the training loop.

Seeding: every random draw comes from a generator seeded by (run seed, purpose, epoch,
..., sample index), so runs reproduce exactly, resume needs no saved RNG state, and
samples are the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
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
from .seeding import Seeds, Slot, seed_for


def use_cpu(device: str | None) -> bool:
    """CPU when asked, or when no accelerator exists (accelerate then runs several CPU processes with gloo)."""
    if device is not None:
        return device == "cpu"
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or has_xpu or torch.backends.mps.is_available())


class RewardMeter:
    """The training reward and its query counter (the queries of every process)."""

    def __init__(self, reward, processes: int = 1):
        self.reward, self.processes, self.queries = reward, processes, 0

    def score(self, images, prompts, metadata=None) -> torch.Tensor:
        """Training reward on this process's samples; counts reward queries (all processes)."""
        return self.score_parts(images, prompts, metadata)[0]

    def score_parts(self, images, prompts, metadata=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward (N,), its parts (N, k)): a weighted sum's k raw parts (weights: `part_weights`), or
        the reward itself as one part."""
        rewards, info = self.reward(images, prompts, metadata)
        self.queries += len(prompts) * self.processes
        names = [name for name, _ in getattr(self.reward, "parts", ())]  # a bare function has no parts
        parts = torch.stack([info[n].float() for n in names], dim=1) if names else rewards.float()[:, None]
        return rewards.float(), parts

    @property
    def part_weights(self) -> torch.Tensor:
        return torch.tensor([w for _, w in getattr(self.reward, "parts", ())] or [1.0], dtype=torch.float64)


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
        self.meter = RewardMeter(self.reward, self.processes)
        if differentiable_reward and not self.reward.differentiable:
            from .methods import get_method, list_methods

            others = [n for n, _ in list_methods() if not get_method(n).requires_differentiable_reward
                      and not get_method(n).offline_data]
            raise ConfigError(f"method '{cfg.method}' needs a differentiable reward, but '{self.reward.name}' is not: "
                              "choose one marked differentiable in `diffalign rewards`, or a method that needs no "
                              f"reward gradient ({', '.join(others)})")
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
        self.seeds = Seeds(cfg.seed, self.dist, self.prompts, self.device)
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

    def _frozen_parts_dtype(self) -> None:
        """With fp16/bf16 mixed precision on an accelerator, the frozen parts (VAE, text encoder)
        are stored in that dtype, as diffusers' training scripts do; the trained weights stay fp32."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.train.mixed_precision)
        if dtype is not None and self.device.type != "cpu":
            for part in self.model.parts.values():
                part.to(dtype=dtype)

    # ---- seeding, data and the reward meter: delegated to `seeds` and `meter` -------------
    def generator(self, *parts) -> torch.Generator:
        return self.seeds.generator(*parts)

    def draw_prompts(self, *parts, n: int) -> list[str]:
        return self.seeds.draw_prompts(*parts, n=n)

    def sample_generators(self, *parts, n_global: int) -> list[torch.Generator]:
        return self.seeds.sample_generators(*parts, n_global=n_global)

    def slots(self, epoch: int, purpose: str, draw=None) -> list[Slot]:
        """The epoch's rollout batches (`Seeds.slots`) of train.batch_size samples each."""
        return self.seeds.slots(epoch, purpose, self.cfg.train.batch_size, self.cfg.train.batches_per_epoch, draw)

    def score(self, images, prompts, metadata=None) -> torch.Tensor:
        """Training reward on this process's samples; counts reward queries (all processes)."""
        return self.meter.score(images, prompts, metadata)

    @property
    def reward_queries(self) -> int:
        return self.meter.queries

    @reward_queries.setter
    def reward_queries(self, n: int) -> None:
        self.meter.queries = n

    # ---- the reference model -------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        """LoRA (the adapter-free base) or a frozen copy; full fine-tuning by a method that
        needs no reference keeps none (no second copy of the weights)."""
        return self.ref_denoiser is not None or self.lora_config is not None

    def keep_reference(self) -> None:
        """For a method whose args decide that it needs the frozen base: with full fine-tuning, keep a
        copy now (call from the method's __init__, before the trainer shards the networks)."""
        if self.lora_config is None and self.ref_denoiser is None:
            self.ref_denoiser = copy.deepcopy(self.model.denoiser).requires_grad_(False).eval()

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
