"""Stable Diffusion pipeline folders: loading (latents, text prompts, guidance, resolution),
folder errors, prompt sources, gradient checkpointing and multi-process runs on a tiny random
pipeline built by `diffalign models make-tiny-sd` (every method on it: tests/test_matrix.py)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import ConfigError
from diffalign.data.prompts import PROMPT_SETS, resolve_prompts
from diffalign.methods import get_method, list_methods
from diffalign.models import load_model
from diffalign.models.sd import ModelFolderError
from diffalign.sampler import Sampler
from diffalign.train import resolve_config, train
from test_matrix import ARGS as MATRIX_ARGS


def test_loads_as_latent_text_model(sd):
    m = load_model(sd)
    assert m.sample_shape == (4, 8, 8) and m.pipeline.resolution == 32
    cond = m.encode_prompts(["a cat", "a dog", "a cat"])
    assert cond.shape == (3, 77, 32)
    assert torch.equal(cond[0], cond[2]) and not torch.equal(cond[0], cond[1])
    assert torch.equal(m.null_condition(2)[0], m.encode_prompts([""])[0])
    x = torch.randn(2, *m.sample_shape, requires_grad=True)
    images = m.decode(x)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    images.mean().backward()
    assert x.grad.abs().sum() > 0  # decode is differentiable (the gradient methods need it)
    assert m.encode_images(torch.rand(2, 3, 48, 48)).shape == (2, 4, 8, 8)  # resized to the model's resolution
    out = m.predict_noise(torch.randn(3, *m.sample_shape), torch.tensor(500), cond)
    assert out.shape == (3, *m.sample_shape)
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = m.denoiser.attn_processors.values()  # PyTorch's scaled_dot_product_attention
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs)


def test_sampler_matches_the_diffusers_pipeline(sd):
    """The base model sampled by diffalign (DDIM, eta 0, guidance 3) equals the pipeline's own loop."""
    from diffusers import StableDiffusionPipeline

    m = load_model(sd)
    latents = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = Sampler(num_steps=5, eta=0.0, guidance_scale=3.0).sample(m, ["a cat", "a dog"], latents=latents,
                                                                     with_logprob=False).final
    pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    pipe.scheduler = m.scheduler.__class__.from_config(pipe.scheduler.config)
    theirs = pipe(["a cat", "a dog"], num_inference_steps=5, guidance_scale=3.0, eta=0.0, latents=latents.clone(),
                  output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-4


def test_resolution_and_negative_prompt_options(sd):
    m = load_model(sd, resolution=64, negative_prompt="blurry")
    assert m.sample_shape == (4, 16, 16)
    assert m.decode(torch.zeros(1, 4, 16, 16)).shape == (1, 3, 64, 64)
    assert torch.equal(m.null_condition(1)[0], m.encode_prompts(["blurry"])[0])
    with pytest.raises(ValueError, match="multiple of the VAE's factor 4"):
        load_model(sd, resolution=30)
    with pytest.raises(ValueError, match="pipeline folders only"):
        load_model("digits", resolution=64)


def test_folder_errors_name_what_is_missing(sd, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelFolderError, match="no model_index.json"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(sd, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelFolderError, match=r"missing vae/diffusion_pytorch_model.safetensors, tokenizer/"):
        load_model(str(broken))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelFolderError, match="StableDiffusionXLPipeline pipeline; diffalign loads"):
        load_model(str(broken))
    # through the command line: one clear line, exit code 2, nothing written
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: ddpo\nmodel: {tmp_path / 'nowhere'}\nreward: ink\nprompts: animals\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_prompt_sources(tmp_path):
    assert resolve_prompts(["a", "b"], []) == ["a", "b"]
    assert resolve_prompts("animals", []) == PROMPT_SETS["animals"]
    f = tmp_path / "p.txt"
    f.write_text("a red car\n\n# comment\na blue car\n")
    assert resolve_prompts(str(f), []) == ["a red car", "a blue car"]
    assert resolve_prompts(None, ["0"]) == ["0"]
    with pytest.raises(ValueError, match="neither a prompt set"):
        resolve_prompts("no-such-set", [])
    with pytest.raises(ValueError, match="no default prompts"):
        resolve_prompts(None, [])


def test_pipeline_without_prompts_is_a_config_error(sd, tmp_path):
    cfg, args = resolve_config(base={"method": "ddpo", "model": sd, "reward": "ink"})
    with pytest.raises(ConfigError, match="prompts"):
        train(cfg, args, tmp_path / "run")
    assert not (tmp_path / "run").exists()


BASE = {"reward": "ink", "prompts": ["a cat", "a dog"], "sampling": {"num_steps": 6}, "optim": {"lr": 1e-2},
        "train": {"batch_size": 4, "batches_per_epoch": 1, "epochs": 1}, "eval": {"reward": None, "per_prompt": 2}}


def test_gradient_checkpointing_gives_the_same_update(sd, tmp_path):
    finals = []
    for flag in (False, True):
        cfg, args = resolve_config(base=dict(BASE, model=sd, method="draft", args={"grad_steps": 2},
                                             train={**BASE["train"], "gradient_checkpointing": flag}))
        train(cfg, args, tmp_path / str(flag))
        finals.append(load_file(str(tmp_path / str(flag) / "final" / "pytorch_lora_weights.safetensors")))
    assert all(torch.allclose(finals[0][k], finals[1][k], atol=1e-6) for k in finals[0])
    assert any(v.abs().sum() > 0 for k, v in finals[1].items() if "lora_B" in k)


def test_gradient_checkpointing_refused_where_unsupported(tmp_path):
    cfg, args = resolve_config(base={"method": "ddpo", "model": "toy2d", "reward": "quadratic", "prompts": [""],
                                     "train": {"gradient_checkpointing": True}})
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        train(cfg, args, tmp_path / "run")


def test_accelerate_launch_two_processes_matches_one(sd, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (two gloo processes; `--cpu`
    would start one) on a pipeline folder: DDPO with two
    global minibatches gives the weights of one process with the same global batch."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    spec = dict(BASE, model=sd, method="ddpo", args={"minibatches": 2})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(spec))
    cfg, args = resolve_config(p)
    train(cfg, args, tmp_path / "one")
    launch = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(launch), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29551",
                        "-m", "diffalign.cli", "train", str(p), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a = load_file(str(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "pytorch_lora_weights.safetensors"))
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_bench_sampler_on_a_pipeline_folder(sd, capsys):
    """`bench sampler --model PATH` times our sampler against the pipeline's own loop (the same
    computation: equal latents at eta 0) and reports one step's memory with and without the
    UNet's gradient checkpointing."""
    from diffalign.bench.sampler import pipeline_loop

    m = load_model(sd)
    s = Sampler(num_steps=3, eta=0.0, guidance_scale=4.0)
    a = pipeline_loop(m, s, ["a cat", "a dog"], torch.Generator().manual_seed(0))
    x = s.noise(m, 2, torch.Generator().manual_seed(0))  # the pipeline loop's own first latents
    b = s.sample(m, ["a cat", "a dog"], latents=x, with_logprob=False).final
    assert (a - b).abs().max() < 1e-4 and (a - x).abs().max() > 1e-2
    assert main(["bench", "sampler", "--model", sd, "--batch", "2", "--steps", "2", "--repeats", "1",
                 "--prompts", "a cat,a dog"]) == 0
    out = capsys.readouterr().out
    assert "diffusers pipeline:" in out and "| train.gradient_checkpointing | peak memory" in out
    rows = json.loads(out[out.index('{\n "toggle"'):out.index("| train.gradient")])["rows"]
    assert [r["checkpoint"] for r in rows] == [True, False] and all(r["step_peak_bytes"] >= 0 for r in rows)


def test_bench_suite_on_a_pipeline_folder(sd, tmp_path):
    """`diffalign bench --suite digits --set model=PATH ...`: the suite's methods (an online and an
    offline one) on a pipeline folder at an equal reward budget; the overrides are part of the
    bench's settings."""
    from diffalign.bench import run_bench

    sets = [f"model={sd}", "prompts=[a cat, a dog]", "reward=brightness", "eval.reward=null",
            "sampling.num_steps=3", "train.batch_size=4", "train.batches_per_epoch=1"]
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "digits", "--methods", "ddpo@args.minibatches=1,diffusion-dpo", "--seeds", "1",
                 "--budget", "8", "--per-prompt", "2", "--out", str(out)] + [x for s in sets for x in ("--set", s)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == sd and len(results["rows"]) == 2
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["ddpo@args.minibatches=1"]["reward_queries"] == 8 and rows["diffusion-dpo"]["reward_queries"] == 8
    assert (out / "report.md").is_file()
    with pytest.raises(ValueError, match="overrides"):  # a bench folder never mixes settings
        run_bench("digits", out, methods=["diffusion-dpo"], seeds=1, budget=8, per_prompt=2, overrides=sets[:-1])


@pytest.fixture(scope="module")
def sd_alpha_one(sd, tmp_path_factory):
    """The tiny folder with the `DDIMScheduler()` defaults some community checkpoints ship: set_alpha_to_one
    true and steps_offset 0 (the last step goes to ā = 1, or stays at t = 0: std 0 either way)."""
    out = tmp_path_factory.mktemp("tiny") / "sd-alpha-one"
    shutil.copytree(sd, out)
    path = out / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "set_alpha_to_one": True, "steps_offset": 0}))
    return str(out)


def test_a_deterministic_last_step_is_refused_at_config_time_for_every_likelihood_method(sd_alpha_one):
    names = [n for n, _ in list_methods() if getattr(get_method(n), "requires_logprob", False)]
    assert len(names) >= 8
    for name in names:
        with pytest.raises(ConfigError, match=r"pipeline\.scheduler\.set_alpha_to_one=false.*steps_offset=1"):
            resolve_config(base=dict(BASE, model=sd_alpha_one, method=name, args=MATRIX_ARGS.get(name, {})))
    # either setting alone leaves a deterministic last step; both give every step a likelihood
    for fix in ({"set_alpha_to_one": False}, {"steps_offset": 1}):
        with pytest.raises(ConfigError, match="deterministic"):
            resolve_config(base=dict(BASE, model=sd_alpha_one, method="ddpo", pipeline={"scheduler": fix}))
    with pytest.raises(ConfigError, match=r"pipeline\.scheduler\.set_alpha_to_on'.*no setting"):
        resolve_config(base=dict(BASE, model=sd_alpha_one, method="ddpo", pipeline={"scheduler": {"set_alpha_to_on": 0}}))
    resolve_config(base=dict(BASE, model=sd_alpha_one, method="alignprop"))  # no likelihood needed: accepted


def test_the_scheduler_override_trains_and_is_exported(sd_alpha_one, tmp_path):
    """With the settings the error names, a likelihood method trains on the folder unchanged, and the export
    carries the settings the run sampled with."""
    sets = ["--set", "pipeline.scheduler.set_alpha_to_one=false", "--set", "pipeline.scheduler.steps_offset=1"]
    for k, v in [("model", sd_alpha_one), ("reward", "ink"), ("prompts", "[a cat, a dog]"), ("sampling.num_steps", 6),
                 ("train.batch_size", 4), ("train.batches_per_epoch", 1), ("train.epochs", 1), ("eval.reward", "null"),
                 ("eval.per_prompt", 2), ("optim.lr", 1e-2)]:
        sets += ["--set", f"{k}={v}"]
    assert main(["train", "configs/ddpo_digits.yaml", *sets, "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    folder = json.loads((__import__("pathlib").Path(sd_alpha_one) / "scheduler" / "scheduler_config.json").read_text())
    assert folder["set_alpha_to_one"] is True  # the user's folder is untouched
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 0
    exported = json.loads((tmp_path / "x" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["set_alpha_to_one"] is False and exported["steps_offset"] == 1
