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
class Share:
    """This process's part of one global minibatch."""

    rows: torch.Tensor  # (n_local,) indices into this process's items (CPU), in the minibatch's order
    size: int  # items in the global minibatch, over all processes
    processes: int

    def __len__(self) -> int:
        return len(self.rows)

    def mean(self, per_item: torch.Tensor) -> torch.Tensor:
        """The local part of the global minibatch mean: with gradients averaged over processes
        (the training loop does that), the update is the mean over the whole minibatch."""
        return per_item.mean() * (len(self.rows) * self.processes / self.size)


class Run:
    """Accelerator, rewards, model (+ adapters), prompts, sampler, and the shared helpers."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator | None = None, out: str | Path | None = None,
                 keep_reference: bool = False, differentiable_reward: bool = False):
        """`keep_reference`: with full fine-tuning, keep a frozen copy of the base as the reference
        (LoRA runs always have one: the base with adapters off). `differentiable_reward`: refuse
        a reward without gradients (checked before any model is loaded)."""
        self.cfg, self.out = cfg, None if out is None else Path(out)
        self.acc = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=use_cpu(cfg.device))
        self.processes, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.train.batch_size % self.processes:
            raise ConfigError(f"config key 'train.batch_size' = {cfg.train.batch_size} is not divisible by the "
                              f"{self.processes} processes: use a multiple of {self.processes}")
        self.local_batch = cfg.train.batch_size // self.processes
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
    def local_slice(self, n_global: int) -> slice:
        n = n_global // self.processes
        return slice(self.rank * n, (self.rank + 1) * n)

    def generator(self, *parts) -> torch.Generator:
        """A CPU generator seeded by (run seed, *parts): the same on every process."""
        return torch.Generator().manual_seed(seed_for(self.cfg.seed, *parts))

    def draw_prompts(self, *parts, n: int) -> list[str]:
        """n prompts drawn uniformly (with replacement) from the training prompts."""
        idx = torch.randint(len(self.prompts), (n,), generator=self.generator("prompts", *parts)).tolist()
        return [self.prompts[i] for i in idx]

    def sample_generators(self, *parts, n_global: int) -> list[torch.Generator]:
        """One generator per sample of this process's slice, seeded by (run seed, *parts, global index)."""
        sl = self.local_slice(n_global)
        return generators(self.device, self.cfg.seed, *parts, indices=range(sl.start, sl.stop))

    def score(self, images, prompts, metadata=None) -> torch.Tensor:
        """Training reward on this process's samples; counts reward queries (all processes)."""
        rewards, _ = self.reward(images, prompts, metadata)
        self.reward_queries += len(prompts) * self.processes
        return rewards.float()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate `t` (same shape on every process) over processes, in process order."""
        return self.acc.gather(t.contiguous().to(self.device))

    def gather_any(self, t: torch.Tensor) -> torch.Tensor:
        """Like `gather`, for 1-d tensors whose length differs between processes."""
        if self.processes == 1:
            return t
        n = self.gather(torch.tensor([len(t)], device=self.device)).cpu()
        padded = torch.zeros(int(n.max()), dtype=t.dtype, device=self.device)
        padded[: len(t)] = t.to(self.device)
        rows = self.gather(padded).view(self.processes, -1).cpu()
        return torch.cat([rows[r, : int(n[r])] for r in range(self.processes)])

    def minibatches(self, keys: torch.Tensor, n: int, generator: torch.Generator) -> list[Share]:
        """Split the items of all processes into min(n, total) global minibatches.

        `keys` are this process's items' global ids (unique over processes, e.g. the global
        sample index): the global order is the sorted keys, a permutation drawn from
        `generator` (the same on every process) shuffles it, `torch.chunk` cuts it (never an
        empty minibatch), and each process takes the items it holds. So a run gives the same
        minibatches, and the same update, for any number of processes."""
        keys = torch.as_tensor(keys, dtype=torch.long).cpu()
        everything = self.gather_any(keys).sort().values
        if len(everything) == 0:
            return []
        if len(everything.unique()) != len(everything):
            raise ValueError("minibatches: item keys must be unique over all processes")
        local_sorted, order = keys.sort()
        shares = []
        for part in everything[torch.randperm(len(everything), generator=generator)].chunk(min(n, len(everything))):
            if len(keys):
                pos = torch.searchsorted(local_sorted, part).clamp(max=len(keys) - 1)
                hit = local_sorted[pos] == part
                rows = order[pos[hit]]
            else:
                rows = keys
            shares.append(Share(rows, len(part), self.processes))
        return shares

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
