"""Benchmarks. `sampler`: wall time of sampling with log-probs (our Sampler) against
diffusers' own loop on the same model, batch and guidance: the scheduler's `step` loop for
the embedded models, the pipeline's own `__call__` (on the same components, latents out)
for a pipeline folder."""

from __future__ import annotations

import statistics
import time

import torch

from ..flow import inference_sigmas, is_flow
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
def pipeline_loop(model, sampler, prompts, generator):
    """The reference for a pipeline folder: the diffusers pipeline's own loop, same components."""
    from ..export import pipeline_class

    info = model.pipeline
    pipe = info.pipe
    if pipe is None:
        parts = model.parts
        pipe = pipeline_class(model.path)(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                          tokenizer=info.tokenizer, unet=model.denoiser,
                                          scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        info.pipe = pipe
    size = info.resolution
    latents = sampler.noise(model, len(prompts), generator)
    # a flow pipeline runs its ODE (no eta) on our grid (diffalign.flow.inference_sigmas: no last micro-step)
    kw = {"sigmas": inference_sigmas(sampler.num_steps)} if is_flow(model.scheduler) else {"eta": sampler.eta}
    if info.name == "FluxPipeline":  # packed 2x2 latent tokens; guidance into the transformer (dev)
        from ..models.flux import pack, unpack

        out = pipe(list(prompts), height=size, width=size, num_inference_steps=sampler.num_steps,
                   guidance_scale=sampler.guidance_scale, latents=pack(latents), generator=generator, **kw,
                   output_type="latent").images
        return unpack(out, *latents.shape[-2:])
    return pipe(list(prompts), height=size, width=size, num_inference_steps=sampler.num_steps,
                guidance_scale=sampler.guidance_scale, latents=latents, generator=generator, **kw,
                negative_prompt=[info.negative_prompt] * len(prompts), output_type="latent").images


def is_pipeline(model) -> bool:
    from ..export import pipeline_folder

    return pipeline_folder(model) is not None and "vae" in model.parts


@torch.no_grad()
def ours(model, sampler, prompts, generator):
    return sampler.sample(model, prompts, generator=generator).final


def bench_sampler(model_name: str = "digits", batch: int = 64, num_steps: int = 20, repeats: int = 7,
                  eta: float = 1.0, prompts=None, resolution: int | None = None) -> dict:
    """Median wall time of each loop (interleaved runs, one warm-up each) and their ratio.
    `prompts`: a list, prompts file or set name (default: the model's own; 'animals' for a pipeline);
    `resolution`: a pipeline folder's image size (default: its own)."""
    from ..data.prompts import resolve_prompts

    model = load_model(model_name, **({"resolution": resolution} if resolution else {}))
    model.denoiser.eval()
    sampler = Sampler(num_steps=num_steps, eta=eta, guidance_scale=model.guidance_scale)
    pool = resolve_prompts(prompts if prompts is not None or model.prompts else "animals", model.prompts)
    prompts = [pool[i % len(pool)] for i in range(batch)]
    times = {"diffusers": [], "diffalign": []}
    fns = {"diffusers": pipeline_loop if is_pipeline(model) else diffusers_loop, "diffalign": ours}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            g = torch.Generator(model.device).manual_seed(r)
            start = time.perf_counter()
            fn(model, sampler, prompts, g)
            if r > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "reference": "pipeline" if is_pipeline(model) else "scheduler loop",
            "pipeline": model.pipeline.name if model.pipeline else None, "resolution": resolution, "batch": batch, "num_steps": num_steps, "repeats": repeats,
            "diffusers_s": med["diffusers"], "diffalign_s": med["diffalign"],
            "ratio": med["diffalign"] / med["diffusers"]}
