"""Stable Diffusion 3 pipeline folders: loading (packed text condition, VAE shift, guidance),
folder errors, LoRA on the transformer in diffusers' layout, on a tiny random pipeline built
by `diffalign models make-tiny-sd3` (with T5, and without it)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign import adapters
from diffalign.flow import inference_sigmas
from diffalign.cli import main
from diffalign.models import ModelFolderError, load_model
from diffalign.eval.run import load_run
from diffalign.sampler import Sampler

PROMPTS = ["a cat", "a dog"]


def diffusers_pipeline(folder, **parts):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unpack(m, cond):
    """(prompt_embeds, pooled) from the packed condition, as the model's `forward` reads it."""
    c = m.denoiser.config
    return cond[:, :-c.pooled_projection_dim].reshape(len(cond), -1, c.joint_attention_dim), \
        cond[:, -c.pooled_projection_dim:]


def test_loads_as_latent_text_model(sd3):
    m = load_model(sd3)
    assert m.sample_shape == (16, 8, 8) and m.pipeline.resolution == 32 and m.pipeline.t5
    assert sorted(m.parts) == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    cond = m.encode_prompts(["a cat", "a dog", "a cat"])
    assert torch.equal(cond[0], cond[2]) and not torch.equal(cond[0], cond[1])
    assert torch.equal(m.null_condition(2)[1], m.encode_prompts([""])[0])
    # the packed condition is exactly what diffusers' pipeline feeds its transformer
    embeds, pooled = unpack(m, cond[:2])
    with torch.no_grad():
        ref, _, ref_pooled, _ = diffusers_pipeline(sd3).encode_prompt(PROMPTS, None, None,
                                                                      do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77 + 256, 64) and pooled.shape == (2, 64)
    assert torch.equal(embeds, ref) and torch.equal(pooled, ref_pooled)
    out = m.predict_noise(torch.randn(3, *m.sample_shape), torch.tensor(500.0), cond)
    assert out.shape == (3, *m.sample_shape) and out.abs().sum() > 0


def test_folder_without_t5(sd3_no_t5):
    """model_index.json lists text_encoder_3 as null: zeros in place of the T5 tokens, as the SD3
    pipeline gives with text_encoder_3=None."""
    m = load_model(sd3_no_t5)
    assert not m.pipeline.t5 and "text_encoder_3" not in m.parts
    embeds, pooled = unpack(m, m.encode_prompts(PROMPTS))
    assert embeds[:, 77:].abs().max() == 0 and embeds[:, :77].abs().max() > 0
    with torch.no_grad():
        ref, _, ref_pooled, _ = diffusers_pipeline(sd3_no_t5, text_encoder_3=None, tokenizer_3=None).encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False)
    assert torch.equal(embeds, ref) and torch.equal(pooled, ref_pooled)


def test_decode_and_encode_use_the_vae_shift(sd3):
    m = load_model(sd3)
    vae = m.parts["vae"]
    assert vae.config.shift_factor != 0
    x = torch.randn(2, *m.sample_shape, requires_grad=True)
    images = m.decode(x)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    images.mean().backward()
    assert x.grad.abs().sum() > 0  # decode is differentiable (the gradient methods need it)
    # the pipeline's own decoding: latents / scaling_factor + shift_factor
    with torch.no_grad():  # the pipeline's own decoding: latents / scaling_factor + shift_factor
        z = x.detach() / vae.config.scaling_factor + vae.config.shift_factor
        assert torch.allclose(images.detach(), ((vae.decode(z).sample + 1) / 2).clamp(0, 1))
        pixels = torch.rand(2, 3, 32, 32)
        mean = vae.encode(pixels * 2 - 1).latent_dist.mean
    assert torch.allclose(m.encode_images(pixels), (mean - vae.config.shift_factor) * vae.config.scaling_factor)
    assert m.encode_images(torch.rand(2, 3, 48, 48)).shape == (2, *m.sample_shape)  # resized to the resolution


def test_guidance_and_options(sd3):
    m = load_model(sd3, resolution=64, negative_prompt="blurry")
    assert m.sample_shape == (16, 16, 16)
    assert m.decode(torch.zeros(1, 16, 16, 16)).shape == (1, 3, 64, 64)
    assert torch.equal(m.null_condition(1)[0], m.encode_prompts(["blurry"])[0])
    x, t, cond = torch.randn(2, *m.sample_shape), torch.tensor(700.0), m.encode_prompts(PROMPTS)
    with torch.no_grad():
        guided = Sampler(guidance_scale=3.0).predict(m, x, t, cond)
        u, c = m.predict_noise(x, t, m.null_condition(2)), m.predict_noise(x, t, cond)
    assert guided.shape == x.shape and torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the VAE's factor 4"):
        load_model(sd3, resolution=30)


def test_folder_errors_name_what_is_missing(sd3, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd3, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(ModelFolderError, match=r"Stable Diffusion 3 pipeline folder: missing "
                                               r"transformer/diffusion_pytorch_model.safetensors, tokenizer_3/.*"
                                               r"make-tiny-sd3"):
        load_model(str(broken))
    shutil.rmtree(broken)
    shutil.copytree(sd3, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelFolderError, match="StableDiffusionXLPipeline pipeline; diffalign loads.*FluxPipeline, "
                                               "StableDiffusion3Pipeline"):
        load_model(str(broken))


def test_dynamic_shifting_is_fixed_to_the_resolution_as_the_pipeline_does(sd3, tmp_path):
    """A scheduler with use_dynamic_shifting (SD3.5-style configs may set it): μ from the image's token count,
    as StableDiffusion3Pipeline computes it; our eta-0 samples are the pipeline's at two resolutions."""
    folder = tmp_path / "dynamic"
    shutil.copytree(sd3, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dynamic_shifting": True}))
    for side in (32, 64):
        m = load_model(str(folder), resolution=side)
        latents = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
        ours = Sampler(num_steps=4, eta=0.0, guidance_scale=3.0).sample(m, PROMPTS, latents=latents,
                                                                         with_logprob=False).final
        theirs = diffusers_pipeline(str(folder))(PROMPTS, height=side, width=side, num_inference_steps=4,
                                                 guidance_scale=3.0, latents=latents.clone(),
                                                 sigmas=inference_sigmas(4), output_type="latent").images
        assert (ours - theirs).abs().max() < 1e-4
    assert m.scheduler.shift != load_model(str(folder), resolution=32).scheduler.shift  # it depends on the size


def test_lora_on_the_transformer_loads_in_diffusers(sd3, tmp_path):
    """LoRA on every joint-attention projection; the saved file (prefix `transformer.`) gives the
    same transformer output in diffusers' `load_lora_weights`, and adapters off is the base."""
    m = load_model(sd3)
    config = adapters.add_lora(m.denoiser, m.lora_targets, rank=4, alpha=4.0)
    adapted = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
               for n, mod in m.denoiser.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == set(m.lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, t, cond = torch.randn(2, *m.sample_shape), torch.tensor(400.0), m.encode_prompts(PROMPTS)
    with torch.no_grad():
        ours = m.predict_noise(x, t, cond)
        with adapters.adapters_disabled(m.denoiser):
            base = m.predict_noise(x, t, cond)
    assert (ours - base).abs().max() > 1e-3
    adapters.write_lora(m.denoiser, tmp_path, config, prefix="transformer.")
    pipe = diffusers_pipeline(sd3)
    with torch.no_grad():
        embeds, pooled = unpack(m, cond)
        before = pipe.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds,
                                  pooled_projections=pooled, return_dict=False)[0]
        pipe.load_lora_weights(str(tmp_path))
        after = pipe.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)[0]
    assert (before - base).abs().max() < 1e-5 and (after - ours).abs().max() < 1e-5


@pytest.mark.parametrize("solver", ["dpmsolver++", "unipc"])
def test_solver_rollouts_match_the_pipeline_with_that_scheduler(sd3, solver):
    """`sampling.scheduler: dpmsolver++ | unipc` on an SD3 folder: our rollout equals
    StableDiffusion3Pipeline's with the same diffusers scheduler swapped in (flow sigmas, the folder's
    shift), guidance 3, same initial latents."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    m = load_model(sd3)
    latents = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = Sampler(num_steps=4, eta=0.0, guidance_scale=3.0, solver=solver).sample(m, PROMPTS, latents=latents,
                                                                                  with_logprob=False).final
    pipe = diffusers_pipeline(sd3)
    cls = DPMSolverMultistepScheduler if solver == "dpmsolver++" else UniPCMultistepScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, use_flow_sigmas=True, prediction_type="flow_prediction",
                                     flow_shift=float(m.scheduler.shift), solver_order=2)
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=3.0, latents=latents.clone(),
                  output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-4 and (ours - latents).abs().max() > 1e-2


def test_field_net_starts_at_zero(sd3):
    m = load_model(sd3)
    net = m.make_field_net()
    out = m.forward(net, torch.randn(2, *m.sample_shape), torch.full((2,), 300.0), m.encode_prompts(PROMPTS))
    assert out.shape == (2, *m.sample_shape) and out.abs().max() == 0
    assert any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("which", ["sd3", "sd3_no_t5"])
def test_sampler_matches_the_diffusers_pipeline(which, request):
    """At eta 0 our sampler (flow ODE, guidance 3) gives StableDiffusion3Pipeline's own latents."""
    folder = request.getfixturevalue(which)
    m = load_model(folder)
    latents = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = Sampler(num_steps=4, eta=0.0, guidance_scale=3.0).sample(m, PROMPTS, latents=latents,
                                                                     with_logprob=False).final
    pipe = diffusers_pipeline(folder, **({} if m.pipeline.t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=3.0, latents=latents.clone(),
                  sigmas=inference_sigmas(4), output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-4 and (ours - latents).abs().max() > 1e-2
    if which == "sd3":  # `bench sampler`'s reference loop: the same pipeline on the loaded parts
        from diffalign.bench.sampler import pipeline_loop

        s = Sampler(num_steps=4, eta=0.0, guidance_scale=3.0)
        assert (pipeline_loop(m, s, PROMPTS, torch.Generator().manual_seed(0)) - theirs).abs().max() < 1e-4
    noisy = Sampler(num_steps=4, eta=0.7, guidance_scale=3.0).sample(m, PROMPTS, latents=latents,
                                                                     generator=torch.Generator().manual_seed(1))
    assert (noisy.final - theirs).abs().max() > 1e-3 and torch.isfinite(noisy.log_probs).all()


TRAIN = ["model={}", "prompts=[a cat, a dog]", "reward=brightness", "eval.reward=null", "train.epochs=1",
         "train.batch_size=4", "train.batches_per_epoch=1", "sampling.num_steps=4", "eval.per_prompt=2",
         "optim.lr=3e-2", "lora.rank=4", "lora.alpha=16", "args.inner_epochs=1", "args.minibatches=2"]


def train_cli(folder, out, *sets, config="configs/ddpo_digits.yaml"):
    """`diffalign train CONFIG` on the folder with TRAIN's settings, then `sets` (later ones win)."""
    args = [x for s in TRAIN + list(sets) for x in ("--set", s.format(folder))]
    assert main(["train", config, *args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ddpo_run(sd3, tmp_path_factory):
    """DDPO (the digits config, SDE sampling at eta 1) for one epoch on the tiny SD3 folder."""
    return train_cli(sd3, tmp_path_factory.mktemp("runs") / "ddpo")


def aligned(run_dir, x):
    """diffalign's aligned model of the run, ODE (eta 0), guidance 3, on `x`."""
    with torch.no_grad():
        return Sampler(num_steps=4, eta=0.0, guidance_scale=3.0).sample(load_run(run_dir).run.model, PROMPTS,
                                                                         latents=x.clone(), with_logprob=False).final


def pipeline_latents(pipe, x):
    with torch.no_grad():
        return pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=3.0, latents=x.clone(),
                    sigmas=inference_sigmas(4), output_type="latent").images


def test_ddpo_trains_a_lora_with_the_sde(ddpo_run):
    summary = json.loads((ddpo_run / "summary.json").read_text())
    assert summary["finished"] and summary["method"] == "ddpo"
    config = (ddpo_run / "config.yaml").read_text()
    assert "eta: 1.0" in config and "sde: flow-grpo" in config
    row = json.loads((ddpo_run / "metrics.jsonl").read_text().splitlines()[0])
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float))
    lora = load_file(str(ddpo_run / "final" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def ddpo_samples(sd3, ddpo_run):
    """(noise, the run's aligned samples from it) at eta 0; they differ from the base model's."""
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = aligned(ddpo_run, x)
    assert (mine - pipeline_latents(diffusers_pipeline(sd3), x)).abs().max() > 1e-3  # so the tests below can fail
    return x, mine


@pytest.mark.parametrize("merge", [False, True])
def test_export_reproduces_our_samples_in_diffusers(ddpo_run, ddpo_samples, tmp_path, merge):
    from diffusers import StableDiffusion3Pipeline

    x, mine = ddpo_samples
    out = tmp_path / "export"
    assert main(["export", str(ddpo_run), "--out", str(out)] + (["--merge"] if merge else [])) == 0
    assert (out / "pytorch_lora_weights.safetensors").exists() is not merge
    pipe = diffusers_pipeline(str(out))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    if not merge:
        pipe.load_lora_weights(str(out))
    assert (mine - pipeline_latents(pipe, x)).abs().max() <= 1e-4


def test_full_fine_tune_final_is_a_pipeline_folder(sd3, tmp_path):
    run = train_cli(sd3, tmp_path / "full", "lora.enabled=false", "optim.lr=1e-3")
    tuned = load_file(str(run / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = load_file(f"{sd3}/transformer/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (aligned(run, x) - pipeline_latents(diffusers_pipeline(str(run / "final")), x)).abs().max() <= 1e-4


def test_grpo_with_a_mix_window_trains_on_an_sd3_folder(sd3, tmp_path):
    """GRPO (the digits-flow config) on the SD3 folder: groups of 2 per prompt, the SDE on a 2-step
    MixGRPO window of 4, ratio 1 at the first update, a LoRA that moved."""
    run = train_cli(sd3, tmp_path / "grpo", "args.group_size=2", "args.mix_window=2", "args.minibatches=1",
                    config="configs/grpo_digits_flow.yaml")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float))
    assert abs(row["ratio"] - 1) < 1e-5 and row["approx_kl"] < 1e-10  # one update per epoch: all at θ_old
    lora = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


@pytest.mark.parametrize("method", ["nft", "awm"])
def test_forward_process_methods_train_and_export_on_an_sd3_folder(sd3, tmp_path, method):
    """DiffusionNFT and AWM (their digits-flow configs, no guidance; rollouts through DPM-Solver++ and
    UniPC) for one epoch on the SD3 folder; the LoRA they write loads with diffusers and gives our
    aligned samples."""
    sets = [x for s in TRAIN if not s.startswith("args.inner_epochs") for x in ("--set", s.format(sd3))]
    run = tmp_path / method
    solver = {"nft": "dpmsolver++", "awm": "unipc"}[method]  # rollouts through a 2nd-order diffusers solver
    assert main(["train", f"configs/{method}_digits_flow.yaml", *sets, "--set", "args.group_size=2", "--set",
                 f"sampling.scheduler={solver}", "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["method"] == method
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["x0_norm"] > 0 and "old_deviate" in row
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = aligned(run, x)
    pipe = diffusers_pipeline(sd3)
    assert (mine - pipeline_latents(pipe, x)).abs().max() > 1e-4  # the adapters moved the samples
    pipe.load_lora_weights(str(run / "final"))
    assert (mine - pipeline_latents(pipe, x)).abs().max() <= 1e-4


def test_adjoint_matching_trains_on_an_sd3_folder(sd3, tmp_path):
    """Adjoint Matching on the SD3 folder (guidance 3): memoryless rollouts, the lean adjoint through the
    transformer and the VAE decoder (brightness), one epoch; the LoRA loads with diffusers and gives our
    aligned samples."""
    run = tmp_path / "am"
    sets = [x for s in TRAIN if not s.startswith(("args.inner_epochs", "args.minibatches"))
            for x in ("--set", s.format(sd3))]
    assert main(["train", "configs/adjoint_matching_digits_flow.yaml", *sets, "--set", "eval.reward=null",
                 "--set", "args.beta=0.01", "--set", "sampling.guidance_scale=3.0", "--out", str(run)]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["adjoint_norm_start"] > 0 and row["loss"] > 0
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = aligned(run, x)
    pipe = diffusers_pipeline(sd3)
    assert (mine - pipeline_latents(pipe, x)).abs().max() > 1e-4
    pipe.load_lora_weights(str(run / "final"))
    assert (mine - pipeline_latents(pipe, x)).abs().max() <= 1e-4
