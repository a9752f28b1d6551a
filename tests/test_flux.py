"""FLUX.1 pipeline folders: packed latents and their ids, the pooled-CLIP + T5 condition from the pipeline's
own `encode_prompt`, the guidance embedding (FLUX.1-dev) instead of CFG, dynamic shifting fixed to the image
size as `FluxPipeline` fixes it; samples, LoRA and exports against diffusers' `FluxPipeline`, on tiny random
folders built by `diffalign models make-tiny-flux`."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign import adapters
from diffalign.cli import main
from diffalign.eval.run import load_run
from diffalign.flow import image_shift, inference_sigmas
from diffalign.models import ModelFolderError, load_model
from diffalign.models.flux import pack, unpack
from diffalign.sampler import Sampler

PROMPTS = ["a cat", "a dog"]
STEPS = 4


def flux_pipeline(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, x, guidance=3.5):
    """FluxPipeline's own eta-0 sampling from our (unpacked) noise x, unpacked."""
    with torch.no_grad():
        out = pipe(PROMPTS, height=32, width=32, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=pack(x), output_type="latent").images
    return unpack(out, x.shape[-2], x.shape[-1])


def ours(model, x, guidance=3.5):
    with torch.no_grad():
        return Sampler(num_steps=STEPS, eta=0.0, guidance_scale=guidance).sample(model, PROMPTS, latents=x.clone(),
                                                                                 with_logprob=False).final


def noise():
    return torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def test_loads_with_the_pipelines_condition_and_packing(flux):
    m = load_model(flux, resolution=32)
    assert m.sample_shape == (16, 8, 8) and m.pipeline.name == "FluxPipeline" and m.guidance_scale == 3.5
    x, t = torch.randn(2, 16, 8, 8), torch.tensor(700.0)
    with torch.no_grad():  # the guidance goes into the transformer: one pass, no classifier-free guidance
        guided = Sampler(guidance_scale=5.0).predict(m, x, t, m.encode_prompts(PROMPTS))
        direct = m.predict_noise(x, t, m.embedded_guidance(m.encode_prompts(PROMPTS), 5.0))
    assert torch.equal(guided, direct)
    assert sorted(m.parts) == ["text_encoder", "text_encoder_2", "vae"]
    cond = m.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = flux_pipeline(flux).encode_prompt(PROMPTS, None, max_sequence_length=512)
    c = m.denoiser.config
    assert torch.equal(cond[:, :-c.pooled_projection_dim - 1].reshape(2, 512, c.joint_attention_dim), embeds)
    assert torch.equal(cond[:, -c.pooled_projection_dim - 1:-1], pooled) and (cond[:, -1] == 3.5).all()
    assert text_ids.abs().max() == 0  # the text ids our forward makes
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(unpack(pack(x), 8, 8), x)
    assert pack(x).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        load_model(flux, resolution=36)
    assert load_model(flux).pipeline.resolution == 512  # the pipeline's default: 128 latent tokens a side x 4


def test_dynamic_shift_is_fixed_as_the_pipeline_fixes_it(flux):
    """μ from the packed token count, exactly FluxPipeline's grid; and image_shift's identity exp(μ)/(exp(μ) +
    1/σ − 1) = s·σ/(1 + (s − 1)·σ) with s = exp(μ) (linear: s = μ) on any σ."""
    m = load_model(flux, resolution=32)
    pipe = flux_pipeline(flux)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    pipe.scheduler.set_timesteps(sigmas=inference_sigmas(STEPS), mu=mu)
    Sampler(num_steps=STEPS).timesteps(m)
    assert torch.allclose(m.scheduler.sigmas, pipe.scheduler.sigmas, atol=1e-6)
    assert math.isclose(m.scheduler.shift, math.exp(mu), rel_tol=1e-9)
    for kind in ("exponential", "linear"):
        dyn = type(pipe.scheduler).from_config({**pipe.scheduler.config, "time_shift_type": kind})
        fixed, mu2 = image_shift(dyn, 1024)
        sig = torch.linspace(0.99, 0.01, 50, dtype=torch.float64)
        assert torch.allclose(torch.as_tensor(dyn.time_shift(mu2, 1.0, sig)),
                              fixed.shift * sig / (1 + (fixed.shift - 1) * sig))
    assert image_shift(m.scheduler, 16) == (m.scheduler, None)  # a fixed shift stays as it is


@pytest.mark.parametrize("which", ["flux", "flux_schnell"])
def test_sampler_matches_the_flux_pipeline(which, request):
    """At eta 0 our sampler gives FluxPipeline's own latents from the same noise: guidance 2.5 through the
    guidance embedding (dev), none at all (schnell). The SDE with log-probs runs on the same grid."""
    folder = request.getfixturevalue(which)
    m = load_model(folder, resolution=32)
    x = noise()
    g = 2.5 if which == "flux" else 1.0  # schnell: the pipeline ignores guidance_scale; ours would be CFG
    mine, theirs = ours(m, x, g), pipeline_latents(flux_pipeline(folder), x, 2.5)
    assert (mine - theirs).abs().max() <= 1e-4 and (mine - x).abs().max() > 1e-2
    if which == "flux":  # the guidance reaches the transformer: another scale, other samples
        assert (ours(m, x, 5.0) - mine).abs().max() > 1e-4
    noisy = Sampler(num_steps=STEPS, eta=0.7, guidance_scale=g).sample(m, PROMPTS, latents=x,
                                                                          generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(noisy.log_probs).all() and (noisy.final - theirs).abs().max() > 1e-3
    assert (noisy.cond[:, -1] == 2.5).all() if which == "flux" else True  # stored with the sampler's guidance


def test_decode_matches_the_pipeline(flux):
    m = load_model(flux, resolution=32)
    x = noise()
    pipe = flux_pipeline(flux)
    with torch.no_grad():
        images = m.decode(x)
        z = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        ref = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pt")
    assert images.shape == (2, 3, 32, 32) and torch.allclose(images, ref, atol=1e-6)


def test_folder_errors(flux, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(flux, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelFolderError, match="FLUX pipeline folder: missing tokenizer_2/.*make-tiny-flux"):
        load_model(str(broken), resolution=32)
    with pytest.raises(ValueError, match="guidance-distilled.*negative prompt has no effect"):
        load_model(flux, resolution=32, negative_prompt="blurry")


def test_schnell_without_guidance_and_its_true_cfg(flux_schnell):
    """No guidance embedding: guidance scale 1 by default; a scale above 1 is CFG against the negative prompt."""
    m = load_model(flux_schnell, resolution=32, negative_prompt="blurry")
    assert m.guidance_scale == 1.0 and m.embedded_guidance is None
    x, t, cond = torch.randn(2, 16, 8, 8), torch.tensor(700.0), m.encode_prompts(PROMPTS)
    with torch.no_grad():
        guided = Sampler(guidance_scale=3.0).predict(m, x, t, cond)
        u, c = m.predict_noise(x, t, m.null_condition(2)), m.predict_noise(x, t, cond)
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)


def test_lora_loads_in_diffusers_and_reproduces_our_samples(flux, tmp_path):
    m = load_model(flux, resolution=32)
    config = adapters.add_lora(m.denoiser, m.lora_targets, rank=4, alpha=4.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = noise()
    mine = ours(m, x)
    with adapters.adapters_disabled(m.denoiser):
        base = ours(m, x)
    assert (mine - base).abs().max() > 1e-3
    adapters.write_lora(m.denoiser, tmp_path, config, prefix="transformer.")
    pipe = flux_pipeline(flux)
    assert (pipeline_latents(pipe, x) - base).abs().max() <= 1e-4
    pipe.load_lora_weights(str(tmp_path))
    assert (pipeline_latents(pipe, x) - mine).abs().max() <= 1e-4


TRAIN = ["model={}", "pipeline.resolution=32", "prompts=[a cat, a dog]", "reward=brightness", "eval.reward=null",
         "train.epochs=1", "train.batch_size=4", "train.batches_per_epoch=1", "sampling.num_steps=4",
         "eval.per_prompt=2", "optim.lr=3e-2", "lora.rank=4", "lora.alpha=16", "args.minibatches=2",
         "train.gradient_checkpointing=true"]


def train_cli(folder, out, *sets, config="configs/grpo_digits_flow.yaml"):
    args = [x for s in TRAIN + ["args.group_size=2"] + list(sets) for x in ("--set", s.format(folder))]
    assert main(["train", config, *args, "--out", str(out)]) == 0
    return out


def aligned(run_dir, x):
    return ours(load_run(run_dir).run.model, x)


@pytest.fixture(scope="module")
def grpo_run(flux, tmp_path_factory):
    return train_cli(flux, tmp_path_factory.mktemp("runs") / "grpo")


def test_grpo_trains_a_lora_on_a_flux_folder(grpo_run):
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["finished"] and summary["method"] == "grpo"
    row = json.loads((grpo_run / "metrics.jsonl").read_text().splitlines()[0])
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float))
    lora = load_file(str(grpo_run / "final" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


@pytest.mark.parametrize("merge", [False, True])
def test_export_reproduces_our_samples_in_diffusers(flux, grpo_run, tmp_path, merge):
    from diffusers import FluxPipeline

    x = noise()
    mine = aligned(grpo_run, x)
    assert (mine - pipeline_latents(flux_pipeline(flux), x)).abs().max() > 1e-4  # the LoRA moved the samples
    out = tmp_path / "export"
    assert main(["export", str(grpo_run), "--out", str(out)] + (["--merge"] if merge else [])) == 0
    assert (out / "pytorch_lora_weights.safetensors").exists() is not merge
    pipe = flux_pipeline(str(out))
    assert isinstance(pipe, FluxPipeline)
    if not merge:
        pipe.load_lora_weights(str(out))
    assert (mine - pipeline_latents(pipe, x)).abs().max() <= 1e-4


def test_full_fine_tune_final_is_a_flux_folder(flux, tmp_path):
    run = train_cli(flux, tmp_path / "full", "lora.enabled=false", "optim.lr=1e-3")
    tuned = load_file(str(run / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = load_file(f"{flux}/transformer/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    x = noise()
    assert (aligned(run, x) - pipeline_latents(flux_pipeline(str(run / "final")), x)).abs().max() <= 1e-4


def test_bench_samplers_reference_loop_on_a_flux_folder(flux):
    """`bench sampler --model PATH --resolution R` times our sampler against the pipeline's own loop: on a FLUX
    folder (packed latents, guidance embedding) that loop gives our eta-0 latents. (The command itself, with its
    memory measurement, is run on an SD folder in tests/test_sd.py.)"""
    from diffalign.bench.sampler import pipeline_loop

    m = load_model(flux, resolution=32)
    s = Sampler(num_steps=3, eta=0.0, guidance_scale=3.0)
    a = pipeline_loop(m, s, PROMPTS, torch.Generator().manual_seed(0))
    x = s.noise(m, 2, torch.Generator().manual_seed(0))
    b = s.sample(m, PROMPTS, latents=x, with_logprob=False).final
    assert (a - b).abs().max() < 1e-4 and (a - x).abs().max() > 1e-2
