"""Export to diffusers: a run's LoRA file loads with `load_lora_weights` and reproduces
diffalign's samples (alpha / rank scale included), `diffalign export` writes pipeline
folders (LoRA beside, or merged), and a full fine-tune's final/ is a whole pipeline."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffalign.cli import main
from diffalign.eval.run import load_run
from diffalign.sampler import Sampler
from diffalign.train import resolve_config, train

PROMPTS = ["a cat", "a dog"]
BASE = {"method": "ddpo", "reward": "brightness", "prompts": PROMPTS, "sampling": {"num_steps": 4},
        "optim": {"lr": 3e-2}, "train": {"batch_size": 4, "batches_per_epoch": 1, "epochs": 1},
        "eval": {"reward": None, "per_prompt": 2}}


@pytest.fixture(scope="module")
def lora_run(sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    cfg, args = resolve_config(base=dict(BASE, model=sd, lora={"rank": 4, "alpha": 16.0}))
    train(cfg, args, out)
    return out


def ours(run_dir, latents):
    """diffalign's aligned model of the run, DDIM eta 0, guidance 3, on `latents`."""
    loaded = load_run(run_dir)
    with torch.no_grad():
        return Sampler(num_steps=5, eta=0.0, guidance_scale=3.0).sample(loaded.run.model, PROMPTS, latents=latents.clone(),
                                                                        with_logprob=False).final


def theirs(pipe, latents):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, eta=0.0, latents=latents.clone(),
                    output_type="latent").images


def latents():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_lora_file_loads_in_diffusers_and_reproduces_our_samples(sd, lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    final = lora_run / "final"
    with safe_open(str(final / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 16.0
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)
    x = latents()
    mine = ours(lora_run, x)
    pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    base = theirs(pipe, x)
    assert (mine - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison below can fail
    pipe.load_lora_weights(str(final))
    assert (mine - theirs(pipe, x)).abs().max() <= 1e-4
    # without the metadata diffusers assumes alpha = rank (scale 1, not 4): the samples differ
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(str(final / "pytorch_lora_weights.safetensors")), str(bare / "pytorch_lora_weights.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    pipe.load_lora_weights(str(bare))
    assert (mine - theirs(pipe, x)).abs().max() > 1e-4


@pytest.mark.parametrize("merge", [False, True])
def test_export_writes_a_pipeline_folder(sd, lora_run, tmp_path, merge):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "export"
    assert main(["export", str(lora_run), "--out", str(out)] + (["--merge"] if merge else [])) == 0
    assert (out / "model_index.json").is_file()
    assert (out / "pytorch_lora_weights.safetensors").exists() is not merge
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    if not merge:
        pipe.load_lora_weights(str(out))
    assert (ours(lora_run, latents()) - theirs(pipe, latents())).abs().max() <= 1e-4
    assert main(["export", str(lora_run), "--out", str(out)]) == 2  # never over an existing folder
    check_model_card(lora_run, out, merge)


def check_model_card(run, out, merge):
    """README.md in the Hub's format: YAML metadata (base_model, library_name diffusers, tags with the method,
    the pipeline tag), the run's evaluation table with its own numbers, the config, how to load it."""
    import yaml

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    summary = json.loads((run / "summary.json").read_text())
    assert meta["base_model"] == Path(summary["model"]).name and meta["library_name"] == "diffusers"
    assert summary["method"] in meta["tags"] and "lora" in meta["tags"] and meta["pipeline_tag"] == "text-to-image"
    row = next(line for line in card.splitlines() if line.startswith("| training reward (mean)"))
    assert f"{summary['base_reward_mean']:.3f}" in row and f"{summary['final_reward_mean']:.3f}" in row
    assert f"reward `{summary['reward']}`" in card and "```yaml" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["method"] == summary["method"] and config["lora"]["rank"] == 4
    assert ("fused into the weights" in card) is merge and ("pipe.load_lora_weights" in card) is not merge


def test_full_fine_tune_final_is_a_pipeline_folder(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "full"
    cfg, args = resolve_config(base=dict(BASE, model=sd, lora={"enabled": False}, optim={"lr": 1e-3}))
    train(cfg, args, run)
    pipe = StableDiffusionPipeline.from_pretrained(str(run / "final"), local_files_only=True)
    tuned = load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(f"{sd}/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    assert (ours(run, latents()) - theirs(pipe, latents())).abs().max() <= 1e-4
    assert main(["export", str(run), "--out", str(tmp_path / "export"), "--base-model", "org/tiny-sd"]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "base_model: org/tiny-sd" in card and "full fine-tune of the unet" in card and "lora" not in card.split("---")[1]
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    assert (theirs(again, latents()) - theirs(pipe, latents())).abs().max() == 0


def test_export_refuses_an_embedded_model(tmp_path, capsys):
    run = tmp_path / "toy"
    cfg, args = resolve_config(base={"method": "ddpo", "model": "toy2d", "reward": "quadratic", "prompts": [""],
                                     "sampling": {"num_steps": 4},
                                     "train": {"batch_size": 8, "batches_per_epoch": 1, "epochs": 1},
                                     "eval": {"reward": None, "per_prompt": 4}})
    train(cfg, args, run)
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_and_sample_on_a_pipeline_run(lora_run, tmp_path):
    assert main(["eval", str(lora_run), "--per-prompt", "2"]) == 0
    result = json.loads((lora_run / "eval.json").read_text())
    assert result["aligned"]["win_rate"] is not None and result["aligned"]["kl"] > 0
    assert main(["sample", str(lora_run), "--out", str(tmp_path / "s.png"), "--n", "2"]) == 0
    assert (tmp_path / "s.png").is_file()
