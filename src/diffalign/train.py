"""The training loop every method plugs into.

    for epoch:   reseed from (seed, epoch)
                 data, metrics = method.collect(epoch)          # sample + reward, no grad
                 for micro in method.micro_steps(data):          # losses
                     backward (no gradient sync until the step); clip; optimizer step
                 log metrics, evaluate, checkpoint atomically

Runs through accelerate (device placement, mixed precision, several processes).
`batch_size` is global: each of P processes samples batch_size / P of it, and
every sample i draws its noise from its own generator seeded by (seed, epoch, i),
so a run gives the same samples whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import adapters, checkpoint
from .config import ConfigError, RunConfig, dump_config, from_dict, load_raw, merge_under
from .methods import Micro, get_method
from .models import load_model
from .rewards import build_reward
from .seeding import generators, seed_for


def resolve_config(path=None, overrides=None, base: dict | None = None) -> tuple[RunConfig, object]:
    """Load a config, apply the method's defaults under it, validate everything."""
    raw = load_raw(path, overrides, base)
    method_cls = get_method(from_dict(RunConfig, raw).method)  # validates keys and types first
    cfg = from_dict(RunConfig, merge_under(getattr(method_cls, "defaults", {}), raw))
    args = from_dict(method_cls.Config, cfg.args, "args")
    if method_cls.requires_logprob and cfg.sampling.eta <= 0:
        raise ConfigError(
            f"method '{cfg.method}' needs step log-probabilities, but sampling.eta = {cfg.sampling.eta} makes "
            "every step deterministic: set sampling.eta > 0 (1.0 = DDPM variance)"
        )
    return cfg, args


def _use_cpu(device: str | None) -> bool:
    """CPU when asked, or when no accelerator exists (accelerate then runs several CPU processes with gloo)."""
    if device is not None:
        return device == "cpu"
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or has_xpu or torch.backends.mps.is_available())


class Trainer:
    """Holds what the methods share: model, policy, reward, accelerator, counters."""

    def __init__(self, cfg: RunConfig, args, out_dir: str | Path, accelerator: Accelerator | None = None,
                 build_method: bool = True):
        self.cfg, self.args, self.out = cfg, args, Path(out_dir)
        self.method_cls = get_method(cfg.method)
        self.acc = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=_use_cpu(cfg.device))
        P = self.acc.num_processes
        if cfg.train.batch_size % P:
            raise ConfigError(
                f"config key 'train.batch_size' = {cfg.train.batch_size} is not divisible by the "
                f"{P} processes: use a multiple of {P}"
            )
        self.local_batch = cfg.train.batch_size // P
        self.device = self.acc.device

        # reward first: a bad reward spec fails before any model is pretrained
        self.reward = build_reward(cfg.reward, device=str(self.device))
        if self.method_cls.requires_differentiable_reward and not self.reward.differentiable:
            raise ConfigError(
                f"method '{cfg.method}' needs a differentiable reward, but '{self.reward.name}' is not "
                "(choose one marked differentiable in `diffalign rewards`)"
            )
        self.eval_reward = build_reward(cfg.eval.reward, device=str(self.device)) if cfg.eval.reward else None

        with self.acc.main_process_first():  # main pretrains/caches, the others then load
            self.model = load_model(cfg.model, progress=self.acc.is_main_process)
        self.model.to(self.device)
        self.prompts = list(cfg.prompts or self.model.prompts)
        for p in self.prompts:
            self.model.encode_prompts([p])  # a bad prompt fails now, with the model's message
        self.lora_config = None
        den = self.model.denoiser
        torch.manual_seed(seed_for(cfg.seed, "init"))  # adapter init is part of the run's seed
        if cfg.lora.enabled:
            targets = cfg.lora.targets or self.model.lora_targets
            self.lora_config = adapters.add_lora(den, targets, cfg.lora.rank, cfg.lora.alpha)
            self.ref_denoiser = None
        else:
            den.requires_grad_(True)
            self.ref_denoiser = None
            if self.method_cls.requires_reference:  # full fine-tuning keeps a frozen copy
                import copy

                self.ref_denoiser = copy.deepcopy(den).requires_grad_(False).eval()
        den.train()
        params = [p for p in den.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
        wrapped, self.optimizer = self.acc.prepare(den, self.optimizer)
        self.policy = dataclasses.replace(self.model, denoiser=wrapped)  # for loss passes (gradient sync)
        self.method = self.method_cls(self, args) if build_method else None  # None: evaluation only
        self.epoch = 0
        self.reward_queries = 0
        self.wall_prev = 0.0

    # ---- helpers methods use -------------------------------------------------
    def local_slice(self, n_global: int) -> slice:
        n = n_global // self.acc.num_processes
        return slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)

    def draw_prompts(self, *parts, n: int) -> list[str]:
        """n prompts drawn uniformly (with replacement) from the training prompts."""
        g = torch.Generator().manual_seed(seed_for(self.cfg.seed, "prompts", *parts))
        idx = torch.randint(len(self.prompts), (n,), generator=g).tolist()
        return [self.prompts[i] for i in idx]

    def sample_generators(self, *parts, n_global: int) -> list[torch.Generator]:
        sl = self.local_slice(n_global)
        return generators(self.device, self.cfg.seed, *parts, indices=range(sl.start, sl.stop))

    def score(self, images, prompts, metadata=None) -> torch.Tensor:
        """Training reward on this process's samples; counts reward queries (all processes)."""
        rewards, _ = self.reward(images, prompts, metadata)
        self.reward_queries += len(prompts) * self.acc.num_processes
        return rewards.float()

    @property
    def has_reference(self) -> bool:
        """LoRA (the adapter-free base) or a frozen copy; full fine-tuning by a method that
        needs no reference keeps none (no second copy of the weights)."""
        return self.ref_denoiser is not None or self.lora_config is not None

    @contextlib.contextmanager
    def reference(self):
        """Inside, `self.model`/`self.policy` compute the frozen base model."""
        if self.ref_denoiser is not None:
            saved = self.model.denoiser, self.policy.denoiser
            self.model.denoiser = self.policy.denoiser = self.ref_denoiser
            try:
                yield
            finally:
                self.model.denoiser, self.policy.denoiser = saved
        else:
            with adapters.adapters_disabled(self.model.denoiser):
                yield

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(t.contiguous().to(self.device))

    # ---- the loop ---------------------------------------------------------------
    def _backward(self, micro: Micro) -> dict:
        sync = contextlib.nullcontext() if micro.step else self.acc.no_sync(self.policy.denoiser)
        with sync:
            loss, metrics = micro.compute()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} in method '{self.cfg.method}'; lower optim.lr")
            self.acc.backward(loss)
        if micro.step:
            if self.cfg.optim.grad_clip > 0:
                self.acc.clip_grad_norm_(self.policy.denoiser.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in metrics.items()}

    def train_epoch(self, epoch: int) -> dict:
        torch.manual_seed(seed_for(self.cfg.seed, "torch", epoch, self.acc.process_index))
        self.model.denoiser.eval()
        with torch.no_grad():
            data, metrics = self.method.collect(epoch)
        self.model.denoiser.train()
        sums: dict[str, list[float]] = {}
        for micro in self.method.micro_steps(data):
            for k, v in self._backward(micro).items():
                sums.setdefault(k, []).append(v)
        metrics.update({k: sum(v) / len(v) for k, v in sums.items()})
        return metrics

    def state(self) -> dict:
        return {"epoch": self.epoch, "reward_queries": self.reward_queries, "wall_s": self.wall_prev,
                "method": self.method.state_dict()}

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            checkpoint.save(self.out / "checkpoints", adapters.unwrap(self.policy.denoiser), self.optimizer,
                            self.state(), keep=self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        state = checkpoint.load(path, adapters.unwrap(self.policy.denoiser), self.optimizer)
        self.epoch, self.reward_queries = state["epoch"], state["reward_queries"]
        self.wall_prev = state.get("wall_s", 0.0)
        self.method.load_state_dict(state["method"])

    def save_weights(self, folder: Path) -> None:
        den = adapters.unwrap(self.policy.denoiser)
        if self.lora_config is not None:
            adapters.save_lora(den, folder, self.lora_config)
        elif hasattr(den, "save_pretrained"):  # full fine-tune: a diffusers `unet/` folder
            with checkpoint.atomic_dir(folder) as tmp:
                den.save_pretrained(tmp / "unet")
        else:
            raise TypeError(f"cannot save a {type(den).__name__}: it has no save_pretrained")


def start_run(cfg: RunConfig, out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished or different run; write the resolved config."""
    cfg_path = out / "config.yaml"
    if resume:
        if not cfg_path.exists():
            raise FileNotFoundError(f"{out} holds no run to resume (no config.yaml)")
        return
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"run folder {out} is not empty: resume it with `diffalign train --resume {out}` "
            "or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(cfg_path, dump_config(cfg))


def train(cfg: RunConfig, args, out_dir: str | Path, resume: bool = False, accelerator=None,
          max_epochs: int | None = None) -> dict:
    """Run (or resume) a training run in `out_dir`; return the summary.

    `max_epochs` stops early after that many epochs in this call (for tests and
    time-boxed runs); the run can be resumed later.
    """
    from .eval import compare, evaluate, write_report_images

    out = Path(out_dir)
    trainer = Trainer(cfg, args, out, accelerator)  # validates everything before writing
    acc = trainer.acc
    if acc.is_main_process:
        start_run(cfg, out, resume)
    acc.wait_for_everyone()
    ckpt = checkpoint.latest(out / "checkpoints") if resume else None
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        _say(acc, f"resuming {out} from {ckpt.name} (epoch {trainer.epoch} of {cfg.train.epochs})")
    metrics_path = out / "metrics.jsonl"
    if acc.is_main_process:
        _truncate_metrics(metrics_path, trainer.epoch)

    P = acc.num_processes
    _say(
        acc,
        f"method {cfg.method} | model {cfg.model} | reward {trainer.reward.name} | processes {P}\n"
        f"batch size {cfg.train.batch_size} ({trainer.local_batch} per process) x {cfg.train.batches_per_epoch} "
        f"batches = {cfg.train.batch_size * cfg.train.batches_per_epoch} samples per epoch, "
        + (f"until {cfg.train.reward_budget} reward queries are spent" if cfg.train.reward_budget
           else f"{cfg.train.epochs} epochs")
    )

    base_path = out / "eval_base.json"
    if acc.is_main_process and not base_path.exists():
        base = evaluate(trainer.model, trainer, grid_path=out / "samples" / "base.png", label="base")
        checkpoint.atomic_write_text(base_path, json.dumps(base, indent=1))
    acc.wait_for_everyone()
    base = json.loads(base_path.read_text())

    writer = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    t0 = time.time()
    stop = cfg.train.epochs if max_epochs is None else min(cfg.train.epochs, trainer.epoch + max_epochs)
    bar = tqdm(total=None if cfg.train.reward_budget else cfg.train.epochs, initial=trainer.epoch, desc=cfg.method,
               unit="epoch", disable=not acc.is_main_process)
    while trainer.epoch < stop and not budget_spent(trainer):
        epoch = trainer.epoch
        m = trainer.train_epoch(epoch)
        budget = cfg.train.reward_budget
        if budget and epoch == 0 and trainer.reward_queries > budget:
            raise ConfigError(
                f"one epoch of '{cfg.method}' costs {trainer.reward_queries} reward queries, more than "
                f"train.reward_budget = {budget}: lower train.batch_size or train.batches_per_epoch (or the "
                "method's reward calls per sample, e.g. args.train_steps / args.k)"
            )
        bar.update(1)
        trainer.epoch = epoch + 1
        m.update(epoch=epoch, reward_queries=trainer.reward_queries, wall_s=trainer.wall_prev + time.time() - t0)
        if cfg.eval.every and trainer.epoch % cfg.eval.every == 0 and trainer.epoch < cfg.train.epochs:
            if acc.is_main_process:
                ev = evaluate(trainer.model, trainer)
                m.update({f"eval_{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
            acc.wait_for_everyone()
        if cfg.train.sample_grid_every and trainer.epoch % cfg.train.sample_grid_every == 0 and acc.is_main_process:
            evaluate(trainer.model, trainer, grid_path=out / "samples" / f"epoch-{trainer.epoch:04d}.png", label="")
        if acc.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(k, v, trainer.reward_queries)
            shown = "reward_mean" if "reward_mean" in m else "loss"
            if shown in m:
                bar.set_postfix({shown.split("_")[0]: f"{m[shown]:.3f}"})
        if trainer.epoch % cfg.train.checkpoint_every == 0 or trainer.epoch == stop or budget_spent(trainer):
            trainer.wall_prev += time.time() - t0
            t0 = time.time()
            trainer.save_checkpoint()
    bar.close()
    if writer is not None:
        writer.close()
    if trainer.epoch < cfg.train.epochs and not budget_spent(trainer):
        return {"epoch": trainer.epoch, "finished": False}

    summary = {}
    if acc.is_main_process:
        final = evaluate(trainer.model, trainer, grid_path=out / "samples" / "final.png", label="final",
                         kl=trainer.has_reference)
        final.update(compare(base, final))
        trainer.save_weights(out / "final")
        summary = {
            "method": cfg.method,
            "model": cfg.model,
            "reward": trainer.reward.name,
            "eval_reward": trainer.eval_reward.name if trainer.eval_reward else None,
            "epochs": trainer.epoch,
            "reward_budget": cfg.train.reward_budget or None,
            "base_reward_mean": base["reward_mean"],
            "final_reward_mean": final["reward_mean"],
            "base_eval_reward_mean": base.get("eval_reward_mean"),
            "final_eval_reward_mean": final.get("eval_reward_mean"),
            "win_rate_vs_base": final["win_rate"],
            "eval_win_rate_vs_base": final["eval_win_rate"],
            "kl": final.get("kl"),  # None: full fine-tuning without a reference copy (`diffalign eval` has it)
            "base": base,
            "final": final,
            "reward_queries": trainer.reward_queries,
            "wall_s": round(trainer.wall_prev, 2),
            "processes": P,
            "finished": True,
        }
        checkpoint.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        write_report_images(out)  # after summary.json: the curve shows the final evaluation
    acc.wait_for_everyone()
    return summary


def budget_spent(trainer: Trainer) -> bool:
    """True when another epoch would take the reward queries past `train.reward_budget`.

    An epoch's cost is estimated as the mean cost of the epochs so far, so the first
    epoch always runs; the budget is never exceeded after it."""
    budget = trainer.cfg.train.reward_budget
    if not budget or trainer.epoch == 0:
        return False
    per_epoch = trainer.reward_queries / trainer.epoch
    return trainer.reward_queries + per_epoch > budget


def _say(acc, msg: str) -> None:
    if acc.is_main_process:
        print(msg, flush=True)


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs that the checkpoint being resumed has not seen."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < epoch]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in keep))
