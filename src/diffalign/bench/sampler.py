"""Benchmarks. `sampler`: wall time of sampling with log-probs (our Sampler) against
diffusers' own scheduler loop on the same model, batch and guidance."""

from __future__ import annotations

import statistics
import time

import torch

from ..models import load_model
from ..sampler import Sampler


@torch.no_grad()
def diffusers_loop(model, sampler, prompts, generator):
    """The reference: diffusers' scheduler.step loop, same model calls (with CFG)."""
    s = model.scheduler
    cond = model.encode_prompts(prompts)
    x = sampler.noise(model, len(prompts), generator)
    for t in sampler.timesteps(model):
        x = s.step(sampler.predict(model, x, t, cond), t, x, eta=sampler.eta, generator=generator).prev_sample
    return x


@torch.no_grad()
def ours(model, sampler, prompts, generator):
    return sampler.sample(model, prompts, generator=generator).final


def bench_sampler(model_name: str = "digits", batch: int = 64, num_steps: int = 20, repeats: int = 7,
                  eta: float = 1.0) -> dict:
    """Median wall time of each loop (interleaved runs, one warm-up each) and their ratio."""
    model = load_model(model_name)
    model.denoiser.eval()
    sampler = Sampler(num_steps=num_steps, eta=eta, guidance_scale=model.guidance_scale)
    prompts = [model.prompts[i % len(model.prompts)] for i in range(batch)]
    times = {"diffusers": [], "diffalign": []}
    fns = {"diffusers": diffusers_loop, "diffalign": ours}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            g = torch.Generator(model.device).manual_seed(r)
            start = time.perf_counter()
            fn(model, sampler, prompts, g)
            if r > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "batch": batch, "num_steps": num_steps, "repeats": repeats,
            "diffusers_s": med["diffusers"], "diffalign_s": med["diffalign"],
            "ratio": med["diffalign"] / med["diffusers"]}
