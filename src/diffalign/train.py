"""The training loop every method plugs into.

    for epoch:   reseed from (seed, epoch)
                 batch, metrics = method.collect(epoch)         # sample + reward, no grad
                 for micro in method.micro_steps(batch):         # losses
                     backward; after every `accumulate` Micros: average gradients over
                     processes, clip each module, optimizer step, LR schedule step
                 log metrics, evaluate, checkpoint atomically

One AdamW holds a parameter group per trainable module (`method.modules()`, each with its
own learning rate and weight decay); a diffusers LR schedule scales them all. Runs
through accelerate (device placement, mixed precision, several processes). The loop
averages gradients over processes itself, once per optimizer step, instead of wrapping
modules in DDP: a process holding nothing of a minibatch adds a zero gradient and no
module has to take part in every loss. `batch_size` is global: each of P processes
samples batch_size / P of it, and every sample i draws its noise from its own generator
seeded by (seed, epoch, i), so a run gives the same samples whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import adapters, checkpoint, sharding
from .config import ConfigError, RunConfig, dump_config
from .context import Run
from .export import component, pipeline_folder, write_pipeline
from .methods import Micro, build, modules_of, resolve_config, run_needs, sampler_of
from .schedule import Schedule
from .seeding import seed_for

__all__ = ["Trainer", "resolve_config", "train"]


class Trainer:
    """The run context, the method, its modules and the optimizer; counters."""

    def __init__(self, cfg: RunConfig, args, out_dir: str | Path, accelerator=None):
        self.cfg, self.args, self.out = cfg, args, Path(out_dir)
        self.run = Run(cfg, accelerator, out_dir, **run_needs(cfg.method))
        self.acc = self.run.acc
        self.method = build(self.run, args)
        self.modules = modules_of(self.method, self.run)
        for tr in self.modules.values():
            tr.module.to(self.run.device)
        self.sharded = shard_modules(self)  # {name: True when sharded}; {} without train.sharding: fsdp
        self.params, groups = {}, []
        for name, tr in self.modules.items():
            self.params[name] = [p for p in tr.module.parameters() if p.requires_grad]
            if not self.params[name]:
                raise ValueError(f"method '{cfg.method}': module '{name}' has no trainable parameters")
            groups.append({"params": self.params[name], "name": name,
                           "lr": cfg.optim.lr if tr.lr is None else tr.lr,
                           "weight_decay": cfg.optim.weight_decay if tr.weight_decay is None else tr.weight_decay})
        opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay)
        self.lr_schedule = Schedule(cfg.optim, opt)  # a decaying one spans the run unless optim.total_steps is set
        self.optimizer = self.acc.prepare(opt)
        self.epoch = 0
        self.wall_prev = 0.0

    @property
    def sampler(self):
        return sampler_of(self.method, self.run)

    # ---- one epoch ------------------------------------------------------------------
    def set_training(self, training: bool) -> None:
        """Train or eval mode for every trainable module (eval while sampling and evaluating)."""
        for tr in self.modules.values():
            tr.module.train(training)

    def train_epoch(self, epoch: int) -> dict:
        torch.manual_seed(seed_for(self.cfg.seed, "torch", epoch, self.run.rank))
        self.set_training(False)
        with torch.no_grad(), self.acc.autocast():
            batch, metrics = self.method.collect(epoch)
        metrics.update(self.update(batch))
        return metrics

    def update(self, batch, step: bool = True) -> dict:
        """Every micro-step of one collected batch, with its optimizer steps; mean metrics.
        `step=False` (timing the losses alone): gradients are dropped where a step would be taken."""
        self.set_training(True)
        sums: dict[str, list[float]] = {}
        pending = 0
        for micro in self.method.micro_steps(batch):
            for k, v in self.backward(micro).items():
                sums.setdefault(k, []).append(v)
            pending += 1
            if pending == micro.accumulate:
                self.optimizer_step() if step else self.optimizer.zero_grad(set_to_none=True)
                pending = 0
        if pending:
            raise RuntimeError(f"method '{self.cfg.method}' ended a batch {pending} micro-step(s) into a gradient "
                               "accumulation: yield whole groups of `accumulate` Micros")
        return {k: sum(v) / len(v) for k, v in sums.items()}

    def backward(self, micro: Micro) -> dict:
        """Backward of one micro-batch's loss (divided by its accumulation count); its metrics
        (none for a padding share, which computes only to keep sharded processes in step)."""
        share = micro.share
        if share is not None and len(share) == 0 and not share.pad:
            return {}
        with self.acc.autocast():
            loss, metrics = micro.compute()
        if loss is not None and loss.requires_grad:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} in method '{self.cfg.method}'; lower optim.lr")
            self.acc.backward(loss / micro.accumulate)
        return {} if share is not None and share.pad else {k: float(v) for k, v in metrics.items()}

    @property
    def evaluates(self) -> bool:
        """This process runs the evaluations: the main one, or every one when sharded (a sharded
        network's forward is a collective); only the main one writes."""
        return self.run.dist.is_main or self.run.dist.lockstep

    def optimizer_step(self) -> None:
        if self.run.processes > 1:
            self._average_gradients()
        self.acc.unscale_gradients()  # mixed precision: once, before clipping any module
        for name, tr in self.modules.items():
            clip = self.cfg.optim.grad_clip if tr.grad_clip is None else tr.grad_clip
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params[name], clip)
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:
            self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.on_optimizer_step()

    def _average_gradients(self) -> None:
        """Mean of every module's gradient over processes; a module no process touched keeps none
        (AdamW then leaves it alone: no momentum or weight-decay step)."""
        names = [n for n in self.params if not self.sharded.get(n)]  # FSDP's reduce-scatter averaged the rest
        if not names:
            return
        touched = torch.tensor([float(any(p.grad is not None for p in self.params[n])) for n in names],
                               device=self.run.device)
        touched = self.acc.reduce(touched, reduction="sum")
        for name, flag in zip(names, touched.tolist()):
            if flag == 0:
                continue
            ps = self.params[name]
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = self.acc.reduce(torch.cat([p.grad.flatten() for p in ps]), reduction="mean")
            for p, g in zip(ps, flat.split([p.numel() for p in ps])):
                p.grad.copy_(g.view_as(p))

    # ---- checkpoints and weights ----------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "reward_queries": self.run.reward_queries, "wall_s": self.wall_prev,
                "lr_schedule": self.lr_schedule.state_dict()}

    def method_state(self) -> dict:
        return self.method.state_dict()

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.sharded:
            checkpoint.save_sharded(self.out / "checkpoints", {n: tr.module for n, tr in self.modules.items()},
                                    self.optimizer, self.state(), self.method_state(),
                                    self.cfg.train.keep_checkpoints, self.run.dist)
        elif self.acc.is_main_process:
            checkpoint.save(self.out / "checkpoints", {n: tr.module for n, tr in self.modules.items()}, self.optimizer,
                            self.state(), self.method_state(), keep=self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        state, method_state = checkpoint.load(path, {n: tr.module for n, tr in self.modules.items()}, self.optimizer)
        self.epoch, self.run.reward_queries = state["epoch"], state["reward_queries"]
        self.wall_prev = state.get("wall_s", 0.0)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.method.load_state_dict(method_state)

    def full_weights(self) -> dict | None:
        """Sharded runs: every module's trainable state, whole, gathered on the main process (every
        process must call this: it is a collective). None for unsharded runs."""
        if not self.sharded:
            return None
        return {n: sharding.full_state(tr.module) for n, tr in self.modules.items()}

    def save_weights(self, folder: Path, full: dict | None = None) -> None:
        """final/: the denoiser as diffusers loads it (LoRA file, or a `unet/` folder) when the
        method trains it, and every other module as `<name>.safetensors`. `full`: what
        `full_weights` gathered (sharded runs)."""
        den = adapters.unwrap(self.run.model.denoiser)
        if full is not None and "denoiser" in full and self.run.lora_config is None:
            den = sharding.plain_copy(den, full["denoiser"])  # an unsharded copy, for save_pretrained
        with checkpoint.atomic_dir(folder) as tmp:
            if "denoiser" not in self.modules:
                pass  # e.g. DDO: the pretrained weights are the aligned model's, unchanged
            elif self.run.lora_config is not None:
                adapters.write_lora(den, tmp, self.run.lora_config, component(self.run.model) + ".",
                                    state=None if full is None else full["denoiser"])
            elif pipeline_folder(self.run.model) is not None:  # full fine-tune of a pipeline: the whole folder
                write_pipeline(pipeline_folder(self.run.model), tmp, den, component(self.run.model))
            elif hasattr(den, "save_pretrained"):  # full fine-tune: a diffusers `unet/` folder
                den.save_pretrained(tmp / "unet")
            else:
                raise TypeError(f"cannot save a {type(den).__name__}: it has no save_pretrained")
            for name, tr in self.modules.items():
                if name != "denoiser":
                    state = checkpoint.module_state(tr.module) if full is None else full[name]
                    save_file(state, str(tmp / f"{name}.safetensors"))


def shard_modules(trainer: Trainer) -> dict[str, bool]:
    """With `train.sharding: fsdp` and several processes: FSDP2 on every trained network and on the
    frozen reference copy (`diffalign.sharding`); {name: sharded?}. {} otherwise."""
    cfg, run = trainer.cfg, trainer.run
    if cfg.train.sharding != "fsdp":
        return {}
    if run.processes == 1:
        run.say("train.sharding: fsdp needs several processes (launch with `torchrun --nproc_per_node N` or "
                "`accelerate launch --num_processes N`); this run has one, so it trains unsharded")
        return {}
    policy = sharding.Policy(cfg.train.mixed_precision, cfg.train.cpu_offload)
    done = {name: sharding.shard(tr.module, policy) for name, tr in trainer.modules.items()}
    if run.ref_denoiser is not None:
        sharding.shard(run.ref_denoiser, policy)
    run.dist.lockstep = True
    return done


def sharding_line(trainer: Trainer) -> str:
    """What `train.sharding: fsdp` shards in this run, and what every process keeps whole."""
    if not trainer.sharded:
        return ""
    on = [n for n, s in trainer.sharded.items() if s] + (["reference copy"] if trainer.run.ref_denoiser is not None
                                                         else [])
    whole = [f"{n} (has a 0-d parameter)" for n, s in trainer.sharded.items() if not s]
    whole += ["frozen parts (VAE, text encoders) and rewards"]
    known = {id(tr.module) for tr in trainer.modules.values()} | {id(trainer.run.model.denoiser),
                                                                  id(trainer.run.ref_denoiser)}
    held = [n for n, v in vars(trainer.method).items() if isinstance(v, torch.nn.Module) and id(v) not in known
            and any(True for _ in v.parameters())]
    if held:
        whole.append(f"networks the method holds itself ({', '.join(held)})")
    state = sorted(trainer.method.state_dict())
    if state:
        whole.append(f"the method's own state ({', '.join(state)}: not a network)")
    return (f"\nsharding fsdp over {trainer.run.processes} processes: sharded {', '.join(on)}; "
            f"whole on every process: {'; '.join(whole)}")


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
    """Run (or resume) a training run in `out_dir`; return the summary as summary.json holds it
    (`eval.results.Summary.to_json()`; {} on processes other than the main one).

    `max_epochs` stops early after that many epochs in this call (for tests and
    time-boxed runs); the run can be resumed later: then the result is
    {"epoch": ..., "finished": False}.
    """
    trainer = setup(cfg, args, Path(out_dir), resume, accelerator)
    base = base_evaluation(trainer)
    stop = cfg.train.epochs if max_epochs is None else min(cfg.train.epochs, trainer.epoch + max_epochs)
    log = EpochLog(trainer)
    while trainer.epoch < stop and not budget_spent(trainer):
        metrics = run_epoch(trainer, log)
        with log.paused():  # evaluation is not training time
            periodic_evaluation(trainer, metrics)
        log.write(metrics)
        if trainer.epoch % cfg.train.checkpoint_every == 0 or trainer.epoch == stop or budget_spent(trainer):
            log.bank_time()
            trainer.save_checkpoint()
    if trainer.epoch < cfg.train.epochs and not budget_spent(trainer):
        log.close()
        return {"epoch": trainer.epoch, "finished": False}
    summary = finish(trainer, base)
    log.final(summary)
    log.close()
    return summary.to_json() if summary is not None else {}


def setup(cfg: RunConfig, args, out: Path, resume: bool, accelerator=None) -> Trainer:
    """The trainer, validated before anything is written; the run folder started, or its newest
    checkpoint loaded when resuming; the run described."""
    from .run_folder import open_run

    trainer = Trainer(cfg, args, out, accelerator)  # validates everything before writing
    trainer.method.start()  # e.g. loads and validates a data set: still nothing written
    acc, run = trainer.acc, trainer.run
    if acc.is_main_process:
        start_run(cfg, out, resume)
    acc.wait_for_everyone()
    ckpt = open_run(out).checkpoint if resume else None
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        run.say(f"resuming {out} from {ckpt.name} (epoch {trainer.epoch} of {cfg.train.epochs})")
    if acc.is_main_process:
        _truncate_metrics(out / "metrics.jsonl", trainer.epoch)
    run.say(describe(trainer))
    return trainer


def describe(trainer: Trainer) -> str:
    """Two lines: what trains what, and how much per epoch."""
    cfg, run = trainer.cfg, trainer.run
    modules = ", ".join(f"{n} ({sum(p.numel() for p in ps):,} parameters)" for n, ps in trainer.params.items())
    length = (f"until {cfg.train.reward_budget} reward queries are spent" if cfg.train.reward_budget
              else f"{cfg.train.epochs} epochs")
    return (f"method {cfg.method} | model {cfg.model} | reward {run.reward.name} | processes {run.processes} | "
            f"modules {modules}\n"
            f"batch size {cfg.train.batch_size} ({run.local_batch} per process) x {cfg.train.batches_per_epoch} "
            f"batches = {cfg.train.batch_size * cfg.train.batches_per_epoch} samples per epoch, " + length
            + sharding_line(trainer))


def base_evaluation(trainer: Trainer) -> dict:
    """The base model on the fixed evaluation set: evaluated once (main process), kept in eval_base.json."""
    from .eval import base_context, evaluate

    acc, run, path = trainer.acc, trainer.run, trainer.out / "eval_base.json"
    main = acc.is_main_process
    acc.wait_for_everyone()
    if trainer.evaluates and not path.exists():
        with base_context(run):
            base = evaluate(run, run.sampler, grid_path=trainer.out / "samples" / "base.png" if main else None,
                            label="base")
        if main:
            checkpoint.atomic_write_text(path, json.dumps(base, indent=1))
    acc.wait_for_everyone()
    return json.loads(path.read_text())


def run_epoch(trainer: Trainer, log: EpochLog) -> dict:
    """One epoch (collect, update) and its bookkeeping; every module left in eval mode."""
    cfg, run, epoch = trainer.cfg, trainer.run, trainer.epoch
    metrics = trainer.train_epoch(epoch)
    budget = cfg.train.reward_budget
    if budget and epoch == 0 and run.reward_queries > budget:
        raise ConfigError(
            f"one epoch of '{cfg.method}' costs {run.reward_queries} reward queries, more than "
            f"train.reward_budget = {budget}: lower train.batch_size or train.batches_per_epoch (or the "
            "method's reward calls per sample, e.g. args.train_steps / args.k)"
        )
    trainer.epoch = epoch + 1
    said = trainer.lr_schedule.epoch_done(trainer.epoch, run_epochs(trainer))
    if said:
        run.say(said)
    metrics.update(epoch=epoch, reward_queries=run.reward_queries, wall_s=log.wall_s(),
                   lr=trainer.lr_schedule.get_last_lr()[0])
    trainer.set_training(False)  # evaluation samples every module in eval mode
    return metrics


def periodic_evaluation(trainer: Trainer, metrics: dict) -> None:
    """Every eval.every epochs (not the last: `finish` evaluates it) the fixed evaluation set, into
    `metrics` as eval_*; every train.sample_grid_every epochs a grid of samples (main process)."""
    from .eval import evaluate

    cfg, acc, run, epoch = trainer.cfg, trainer.acc, trainer.run, trainer.epoch
    main = acc.is_main_process
    if cfg.eval.every and epoch % cfg.eval.every == 0 and epoch < cfg.train.epochs:
        if trainer.evaluates:
            ev = evaluate(run, trainer.sampler)
            metrics.update({f"eval_{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
        acc.wait_for_everyone()
    if cfg.train.sample_grid_every and epoch % cfg.train.sample_grid_every == 0 and trainer.evaluates:
        evaluate(run, trainer.sampler, grid_path=trainer.out / "samples" / f"epoch-{epoch:04d}.png" if main else None,
                 label="")


class EpochLog:
    """Where epochs are recorded: metrics.jsonl, the experiment tracker (`train.log_with`: scalars, sample
    grids, the config) and a progress bar (main process), and the wall clock (banked into the trainer at
    each checkpoint)."""

    def __init__(self, trainer: Trainer):
        from .trackers import Tracker

        cfg, self.trainer, self.main = trainer.cfg, trainer, trainer.acc.is_main_process
        self.tracker = None
        if self.main:
            self.tracker = Tracker(cfg.train.log_with, trainer.out, cfg.to_dict())
            self.image("samples/base", trainer.out / "samples" / "base.png")
        self.t0 = time.time()
        self.bar = tqdm(total=None if cfg.train.reward_budget else cfg.train.epochs, initial=trainer.epoch,
                        desc=cfg.method, unit="epoch", disable=not self.main)

    def wall_s(self) -> float:
        """Training time so far, over every call that trained this run."""
        return self.trainer.wall_prev + time.time() - self.t0

    @contextlib.contextmanager
    def paused(self):
        """The wall clock stops inside (periodic evaluation)."""
        start = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - start

    def bank_time(self) -> None:
        """Add the time since the last bank to the trainer's (saved with its checkpoint)."""
        self.trainer.wall_prev += time.time() - self.t0
        self.t0 = time.time()

    def write(self, metrics: dict) -> None:
        self.bar.update(1)
        if not self.main:
            return
        with open(self.trainer.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.tracker.log(metrics, metrics.get("epoch", self.trainer.epoch), self.trainer.run.reward_queries)
        self.image("samples/epoch", self.trainer.out / "samples" / f"epoch-{self.trainer.epoch:04d}.png")
        shown = "reward_mean" if "reward_mean" in metrics else "loss"
        if shown in metrics:
            self.bar.set_postfix({shown.split("_")[0]: f"{metrics[shown]:.3f}"})

    def image(self, key: str, path: Path) -> None:
        if self.tracker is not None and path.is_file():
            self.tracker.log_image(key, path, self.trainer.epoch, self.trainer.run.reward_queries)

    def final(self, summary) -> None:
        """The finished run's final grid and its base-vs-aligned numbers."""
        if self.tracker is None or summary is None:
            return
        self.image("samples/final", self.trainer.out / "samples" / "final.png")
        numbers = {f"final/{k}": v for k, v in summary.to_json().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log(numbers, self.trainer.epoch, self.trainer.run.reward_queries)

    def close(self) -> None:
        self.bar.close()
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def finish(trainer: Trainer, base: dict):
    """The aligned model evaluated against the base, its weights in final/, summary.json and the
    report images (main process); returns the summary there (None elsewhere)."""
    from .eval import Summary, compare, evaluate, write_report_images, write_result

    acc, run, out = trainer.acc, trainer.run, trainer.out
    summary, main = None, acc.is_main_process
    trainer.set_training(False)
    full = trainer.full_weights()  # sharded: gathered on the main process (a collective)
    if trainer.evaluates:
        aligned = evaluate(run, trainer.sampler, grid_path=out / "samples" / "final.png" if main else None,
                           label="final", kl=run.has_reference)
    if main:
        aligned.update(compare(base, aligned))
        trainer.save_weights(out / "final", full)
        summary = Summary(method=trainer.cfg.method, model=trainer.cfg.model, reward=run.reward.name,
                          eval_reward=run.eval_reward.name if run.eval_reward else None, base=base, aligned=aligned,
                          reward_queries=run.reward_queries, wall_s=round(trainer.wall_prev, 2), epochs=trainer.epoch,
                          reward_budget=trainer.cfg.train.reward_budget or None, processes=run.processes)
        write_result(out, summary)
        write_report_images(out)  # after summary.json: the curve shows the final evaluation
    acc.wait_for_everyone()
    return summary


def run_epochs(trainer: Trainer) -> int:
    """The epochs this run will take: train.epochs, or fewer when the reward budget runs out first (at the
    mean cost of the epochs so far, as `budget_spent` counts it)."""
    epochs, budget, queries = trainer.cfg.train.epochs, trainer.cfg.train.reward_budget, trainer.run.reward_queries
    if not budget or trainer.epoch == 0 or queries == 0:
        return epochs
    return min(epochs, max(trainer.epoch, int(budget // (queries / trainer.epoch))))


def budget_spent(trainer: Trainer) -> bool:
    """True when another epoch would take the reward queries past `train.reward_budget`.

    An epoch's cost is estimated as the mean cost of the epochs so far, so the first
    epoch always runs; the budget is never exceeded after it."""
    budget = trainer.cfg.train.reward_budget
    if not budget or trainer.epoch == 0:
        return False
    per_epoch = trainer.run.reward_queries / trainer.epoch
    return trainer.run.reward_queries + per_epoch > budget


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs that the checkpoint being resumed has not seen."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < epoch]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in keep))

