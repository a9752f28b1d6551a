"""Benchmarks. `sampler`: wall time of sampling with log-probs (our trajectory sampler)
against diffusers' own scheduler loop on the same model, batch and guidance."""

from __future__ import annotations

import statistics
import time

import torch

from .. import trajectory
from ..models import load_model


@torch.no_grad()
def diffusers_loop(model, prompts, num_steps, eta, generator):
    """The reference: diffusers' scheduler.step loop, same model calls (with CFG)."""
    from diffusers.utils.torch_utils import randn_tensor

    s = model.scheduler
    s.set_timesteps(num_steps, device=model.device)
    cond = model.encode_prompts(prompts)
    x = randn_tensor((len(prompts), *model.sample_shape), generator=generator, device=model.device)
    for t in s.timesteps:
        eps = trajectory.predict_eps(model, x, t, cond, model.guidance_scale)
        x = s.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x


@torch.no_grad()
def ours(model, prompts, num_steps, eta, generator):
    return trajectory.sample(model, prompts, num_steps=num_steps, eta=eta, generator=generator).final


def bench_sampler(model_name: str = "digits", batch: int = 64, num_steps: int = 20, repeats: int = 7,
                  eta: float = 1.0) -> dict:
    """Median wall time of each loop (interleaved runs, one warm-up each) and their ratio."""
    model = load_model(model_name)
    model.denoiser.eval()
    prompts = [model.prompts[i % len(model.prompts)] for i in range(batch)]
    times = {"diffusers": [], "diffalign": []}
    fns = {"diffusers": diffusers_loop, "diffalign": ours}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            g = torch.Generator(model.device).manual_seed(r)
            start = time.perf_counter()
            fn(model, prompts, num_steps, eta, g)
            if r > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model_name,
        "batch": batch,
        "num_steps": num_steps,
        "repeats": repeats,
        "diffusers_s": med["diffusers"],
        "diffalign_s": med["diffalign"],
        "ratio": med["diffalign"] / med["diffusers"],
    }
