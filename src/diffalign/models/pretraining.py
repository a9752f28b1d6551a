"""Shared by the embedded models: the denoising pretraining loop and folder checks.

`denoising_pretrain` is the epsilon-prediction objective (for a flow-matching scheduler the
rectified-flow objective: σ ~ U(0, 1), x_σ = (1 − σ)·x0 + σ·ε, target ε − x0, timestep σ·T) with AdamW, linear warm-up then
cosine decay (diffusers' `get_cosine_schedule_with_warmup`), gradient clipping and an
exponential moving average of the weights (diffusers' `EMAModel` with its default
warm-up, decay min(ema_decay, (1 + s) / (10 + s))); the EMA weights are saved.
It is deterministic for a given config: the caller seeds model init, and every
batch, timestep and noise draw comes from one generator.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


def denoising_pretrain(
    net: torch.nn.Module,
    scheduler,
    config: dict,
    batch: Callable[[torch.Generator], tuple[torch.Tensor, object]],
    forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, object], torch.Tensor],
    gen: torch.Generator,
    out: Path,
    desc: str,
    progress: bool = True,
) -> dict:
    """Train `net` to predict noise (or velocity); `batch(gen)` returns (x0, cond). Saves EMA weights to `out`.
    Runs with gradients whatever the caller's mode (a first use may come from inside no_grad)."""
    with torch.enable_grad():
        return _pretrain(net, scheduler, config, batch, forward, gen, out, desc, progress)


def _pretrain(net, scheduler, config, batch, forward, gen, out, desc, progress) -> dict:
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from ..flow import is_flow

    start = time.time()
    net.train()
    params = list(net.parameters())
    ema = EMAModel(params, decay=config["ema_decay"])
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", torch.zeros(1)).float()
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config.get("weight_decay", 0.0))
    steps = config["steps"]
    sched = get_cosine_schedule_with_warmup(opt, config["warmup"], steps)
    running = None
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        x0, cond = batch(gen)
        bs = x0.shape[0]
        if is_flow(scheduler):
            sigma = torch.rand(bs, generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma.view(-1, *([1] * (x0.ndim - 1)))
            xt, t, target = (1 - s) * x0 + s * noise, sigma * config["num_train_timesteps"], noise - x0
        else:
            t = torch.randint(0, config["num_train_timesteps"], (bs,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
            xt, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
        loss = F.mse_loss(forward(net, xt, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
    ema.copy_to(params)
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    return {"final_loss": running, "seconds": time.time() - start}


def load_folder(name: str, folder: Path, required: tuple[str, ...], fix: str, load: Callable[[Path], object]):
    """Check a model folder's files, then `load(folder)`; every failure names the folder and the fix."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} model folder {str(folder)!r} does not exist; {fix}")
    for rel in required:
        if not (folder / rel).is_file():
            raise FileNotFoundError(f"{name} model folder {str(folder)!r} is missing {rel!r}; {fix}")
    try:
        return load(folder)
    except Exception as e:  # corrupt weights / config
        raise RuntimeError(f"could not load the {name} model from {str(folder)!r} ({type(e).__name__}: {e}); {fix}") from e


SCHEDULERS = ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler")


def make_scheduler(config: dict):
    """The embedded models' scheduler: DDIM for ε-prediction, or flow matching (`objective: flow`)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if config.get("objective", "epsilon") == "flow":
        # shift 1: σ evenly spaced from 1 to 1/T, then 0; the model sees the timestep σ·T
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config["num_train_timesteps"], shift=1.0)
    # The last DDIM step must keep a nonzero std so its log-prob exists: with
    # set_alpha_to_one=False it goes to alphas_cumprod[0], and steps_offset=1 makes it
    # start from t=1 (with the default offset 0 it would start at t=0 and have std 0).
    # 'leading' spacing (first step t=951): 'trailing' would start at t=999, where
    # the cosine schedule's alpha_bar ~ 2e-9 makes the x0 estimate blow up eps errors.
    return DDIMScheduler(
        num_train_timesteps=config["num_train_timesteps"],
        beta_schedule=config["beta_schedule"],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=config["steps_offset"],
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def load_scheduler(folder: Path):
    """The scheduler saved in `folder` (DDIM or flow matching, by its config's class name)."""
    import json

    import diffusers

    kind = json.loads((Path(folder) / "scheduler_config.json").read_text()).get("_class_name")
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler {kind!r} in {str(folder)!r} is not one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, kind).from_pretrained(folder)
