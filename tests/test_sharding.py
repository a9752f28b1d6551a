"""`train.sharding: fsdp` (PyTorch FSDP2) as a user launches it: `torchrun --nproc_per_node 2` on CPU (gloo).

Tolerance of "same weights": the 2-process runs sum each loss's parts in another order than one
process does (and FSDP's reduce-scatter in another order than an all-reduce), so gradients differ
by float rounding. Adam divides a gradient by its running RMS, so where a gradient is near zero
(a first step is lr · sign(g)) a rounding-level change can flip a weight's step: up to 2 · lr per
step apart, and never more, since an Adam step is at most about lr. Elsewhere the difference stays at
rounding level. The tests therefore ask: every weight within 2 · lr · steps of the other run, and
99.9 % of weights within 1e-6 (measured on digits: 1 vs 2 processes max 1.4e-5 with lr · steps =
4e-4 on 0.008 % of weights, data parallel vs FSDP max 6e-7)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffalign.config import ConfigError
from diffalign.processes import Processes, Share
from diffalign.train import resolve_config, train

DIGITS = {"method": "ddpo", "model": "digits", "reward": "classifier", "prompts": ["1", "7"],
          "lora": {"enabled": False}, "sampling": {"num_steps": 6}, "eval": {"reward": None, "per_prompt": 2},
          "train": {"epochs": 2, "batch_size": 4, "batches_per_epoch": 1}, "args": {"minibatches": 2},
          "optim": {"lr": 1e-4}}


def _yaml(tmp_path, spec, name="c.yaml", **train_keys):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(dict(spec, train=dict(spec["train"], **train_keys))))
    return p


def _torchrun(*args, port, **kw):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "diffalign.cli", *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _unet(run: Path) -> dict:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_same_up_to_rounding(a: dict, b: dict, lr: float, steps: int) -> None:
    assert a.keys() == b.keys() and a
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a]).abs()
    assert diff.max() <= 2 * lr * steps, diff.max()
    assert (diff <= 1e-6).float().mean() >= 0.999, (diff > 1e-6).float().mean()


# ---- the loop's bookkeeping, in one process ------------------------------------------------
def test_padding_share_counts_zero_but_keeps_the_graph():
    x = torch.tensor([2.0, 3.0], requires_grad=True)
    pad = Share(torch.tensor([0]), size=4, processes=2, pad=True)
    loss = pad.mean(x[:1] ** 2)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and torch.equal(x.grad, torch.zeros(2))
    real = Share(torch.tensor([0, 1]), size=4, processes=2)
    assert real.mean(x.detach()).item() == pytest.approx(2.5 * (2 * 2 / 4))


def test_lockstep_minibatches_pad_a_process_holding_none(monkeypatch):
    """Process 1 of 2 holds keys 10, 11; a minibatch drawn from process 0's keys alone gives it a
    padding share of its first item instead of an empty one."""
    p = Processes.single()
    p.count, p.index = 2, 1
    monkeypatch.setattr(p, "gather_any", lambda t: torch.tensor([0, 1, 10, 11]))
    g = torch.Generator().manual_seed(0)
    plain = p.minibatches(torch.tensor([11, 10]), 4, g)
    p.lockstep = True
    stepped = p.minibatches(torch.tensor([11, 10]), 4, torch.Generator().manual_seed(0))
    for a, b in zip(plain, stepped):
        if len(a) == 0:
            assert b.pad and len(b) == 1 and b.rows.tolist() == [1]  # row of key 10, the smallest it holds
        else:
            assert not b.pad and torch.equal(a.rows, b.rows)
    assert any(len(a) == 0 for a in plain)


def test_fsdp_settings_are_checked(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'train.sharding' must be 'none' or 'fsdp'"):
        resolve_config(base=dict(DIGITS, train=dict(DIGITS["train"], sharding="zero3")))
    with pytest.raises(ConfigError, match="train.cpu_offload"):
        resolve_config(base=dict(DIGITS, train=dict(DIGITS["train"], cpu_offload=True)))
    with pytest.raises(ConfigError, match="differentiates through the denoiser twice.*train.sharding: none"):
        resolve_config(base=dict(DIGITS, method="nabla-gfn", train=dict(DIGITS["train"], sharding="fsdp")))
    cfg, args = resolve_config(base=dict(DIGITS, train=dict(DIGITS["train"], sharding="fsdp", epochs=1)))
    s = train(cfg, args, tmp_path / "one")
    assert "fsdp needs several processes" in capsys.readouterr().out and s["processes"] == 1
    assert (tmp_path / "one" / "checkpoints" / "epoch-000001" / "optimizer.pt").exists()  # unsharded


def test_the_run_says_what_is_sharded_and_what_stays_whole():
    from types import SimpleNamespace

    from diffalign.train import sharding_line

    class M:
        def __init__(self):
            self.teacher = torch.nn.Linear(2, 2)  # a network the method keeps for itself

        def state_dict(self):
            return {"mu": torch.zeros(1)}

    den = torch.nn.Linear(2, 2)
    tr = SimpleNamespace(sharded={"denoiser": True, "value": False}, method=M(),
                         modules={"denoiser": SimpleNamespace(module=den), "value": SimpleNamespace(module=None)},
                         run=SimpleNamespace(processes=2, ref_denoiser=None, model=SimpleNamespace(denoiser=den)))
    line = sharding_line(tr)
    assert "sharded denoiser;" in line and "value (has a 0-d parameter)" in line
    assert "networks the method holds itself (teacher)" in line and "own state (mu: not a network)" in line


# ---- two processes ---------------------------------------------------------------------------
def test_fsdp_two_processes_match_one_process_and_data_parallel(tmp_path):
    """Full fine-tune of the digits UNet (DDPO, 2 minibatches x 2 epochs = 4 optimizer steps):
    FSDP over 2 processes, plain data parallel over 2 and one process end with the same weights;
    the sharded run writes sharded checkpoints and a final/unet that diffusers loads."""
    from diffusers import UNet2DModel

    cfg, args = resolve_config(_yaml(tmp_path, DIGITS))
    train(cfg, args, tmp_path / "one")
    _torchrun("train", str(_yaml(tmp_path, DIGITS, "dp.yaml")), "--out", str(tmp_path / "dp"), port=29561)
    r = _torchrun("train", str(_yaml(tmp_path, DIGITS, "fsdp.yaml", sharding="fsdp")), "--out", str(tmp_path / "fsdp"),
                  port=29562)
    assert "sharding fsdp over 2 processes: sharded denoiser" in r.stdout
    ckpt = tmp_path / "fsdp" / "checkpoints" / "epoch-000002"
    assert (ckpt / "shards" / ".metadata").exists() and not (ckpt / "optimizer.pt").exists()
    one, dp, fsdp = _unet(tmp_path / "one"), _unet(tmp_path / "dp"), _unet(tmp_path / "fsdp")
    base = load_file(str(next((Path(os.environ["DIFFALIGN_CACHE"])).glob("digits-*/unet/*.safetensors"))))
    assert max((one[k] - base[k]).abs().max() for k in one) > 1e-4, "training moved the weights"
    assert_same_up_to_rounding(one, fsdp, lr=1e-4, steps=4)
    assert_same_up_to_rounding(dp, fsdp, lr=1e-4, steps=4)
    loaded = UNet2DModel.from_pretrained(tmp_path / "fsdp" / "final" / "unet")
    assert torch.equal(loaded.state_dict()["conv_in.weight"], fsdp["conv_in.weight"])
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["reward_queries"] == 8


def test_fsdp_resume_after_sigkill_is_exact(tmp_path):
    """Both processes killed (SIGKILL to the whole launch) after the second of four sharded
    checkpoints; `--resume` under torchrun ends with the uninterrupted run's weights, bit for bit."""
    spec = dict(DIGITS, sampling={"num_steps": 12}, train=dict(DIGITS["train"], epochs=4, batch_size=8,
                                                               keep_checkpoints=10))
    cfg = _yaml(tmp_path, spec, sharding="fsdp")
    _torchrun("train", str(cfg), "--out", str(tmp_path / "full"), port=29563)
    killed = _torchrun("train", str(cfg), "--out", str(tmp_path / "killed"), port=29564, background=True)
    ckpt = tmp_path / "killed" / "checkpoints" / "epoch-000002"
    deadline = time.time() + 600
    while time.time() < deadline and not ckpt.exists() and killed.poll() is None:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it was killed"
    r = _torchrun("train", "--resume", str(tmp_path / "killed"), port=29565)
    assert "resuming" in r.stdout
    a, b = _unet(tmp_path / "full"), _unet(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method, args, files", [
    ("dpok", {}, ["pytorch_lora_weights.safetensors", "value.safetensors"]),
    ("ddo", {"pool_size": 64, "fit_size": 32, "fit_epochs": 1, "fit_batch": 16, "particles": 4,
             "continuation_steps": 4}, ["potential.safetensors"])])
def test_fsdp_with_a_second_network_and_lora(tmp_path, method, args, files):
    """DPOK: LoRA on the toy2d denoiser and the value network, both sharded; DDO: its potential network
    (the pretrained denoiser stays as it is). Two FSDP processes give the weights of two data-parallel
    processes up to rounding (DDO's one-process run differs from both by more: its pool is sampled in
    per-process batches, so its rounding differs before any gradient is taken)."""
    spec = {"method": method, "model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 6},
            "train": {"epochs": 2, "batch_size": 8, "batches_per_epoch": 1}, "eval": {"reward": None, "per_prompt": 4},
            "optim": {"lr": 1e-3}, "args": args}
    port = {"dpok": 29566, "ddo": 29568}[method]
    _torchrun("train", str(_yaml(tmp_path, spec)), "--out", str(tmp_path / "one"), port=port)
    r = _torchrun("train", str(_yaml(tmp_path, spec, "f.yaml", sharding="fsdp")), "--out", str(tmp_path / "two"),
                  port=port + 1)
    assert "sharding fsdp over 2 processes: sharded " + ", ".join(f.split(".")[0] for f in files).replace(
        "pytorch_lora_weights", "denoiser") in r.stdout
    for name in files:
        x, y = (load_file(str(tmp_path / run / "final" / name)) for run in ("one", "two"))
        assert any(v.abs().max() > 0 for v in x.values())
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_fsdp_on_a_tiny_stable_diffusion_folder(sd, tmp_path):
    """Full fine-tune of a tiny SD 1.x pipeline's UNet (per-block sharding of down/mid/up blocks):
    FSDP over 2 processes matches one process and data parallel; final/ is a pipeline folder that
    diffusers loads. With LoRA, the sharded run's adapter file loads with `load_lora_weights`."""
    from diffusers import StableDiffusionPipeline

    spec = {"method": "ddpo", "model": sd, "reward": "ink", "prompts": ["a cat", "a dog"], "sampling": {"num_steps": 4},
            "lora": {"enabled": False}, "optim": {"lr": 1e-4}, "args": {"minibatches": 2},
            "train": {"batch_size": 4, "batches_per_epoch": 1, "epochs": 1}, "eval": {"reward": None, "per_prompt": 2}}
    cfg, args = resolve_config(_yaml(tmp_path, spec))
    train(cfg, args, tmp_path / "one")
    _torchrun("train", str(_yaml(tmp_path, spec, "dp.yaml")), "--out", str(tmp_path / "dp"), port=29571)
    _torchrun("train", str(_yaml(tmp_path, spec, "fsdp.yaml", sharding="fsdp")), "--out", str(tmp_path / "fsdp"),
              port=29572)
    one, dp, fsdp = _unet(tmp_path / "one"), _unet(tmp_path / "dp"), _unet(tmp_path / "fsdp")
    base = load_file(str(Path(sd) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((one[k] - base[k]).abs().max() for k in one) > 1e-5, "training moved the weights"
    assert_same_up_to_rounding(one, fsdp, lr=1e-4, steps=2)
    assert_same_up_to_rounding(dp, fsdp, lr=1e-4, steps=2)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "fsdp" / "final", safety_checker=None)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], fsdp["conv_in.weight"])

    lora = dict(spec, lora={"enabled": True}, optim={"lr": 1e-2})
    cfg, args = resolve_config(_yaml(tmp_path, lora, "lora1.yaml"))
    train(cfg, args, tmp_path / "lora-one")
    _torchrun("train", str(_yaml(tmp_path, lora, "lora.yaml", sharding="fsdp")), "--out", str(tmp_path / "lora"),
              port=29573)
    a, b = (load_file(str(tmp_path / r / "final" / "pytorch_lora_weights.safetensors")) for r in ("lora-one", "lora"))
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k), "training moved the adapters"
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    pipe.load_lora_weights(tmp_path / "lora" / "final")  # diffusers reads the sharded run's file
    from diffalign.cli import main

    assert main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None)
    assert any(not torch.equal(v, base[k]) for k, v in merged.unet.state_dict().items() if k in base)  # LoRA fused


def test_fsdp_bf16_policy_and_cpu_offload_run(tmp_path):
    """bf16 mixed precision (weights gathered in bf16, gradients reduced in fp32) with CPU offload:
    the run finishes, and the trained weights it writes are fp32 and moved."""
    spec = dict(DIGITS, train=dict(DIGITS["train"], epochs=1))
    _torchrun("train", str(_yaml(tmp_path, spec, sharding="fsdp", mixed_precision="bf16", cpu_offload=True)),
              "--out", str(tmp_path / "bf16"), port=29574)
    w = _unet(tmp_path / "bf16")
    base = load_file(str(next((Path(os.environ["DIFFALIGN_CACHE"])).glob("digits-*/unet/*.safetensors"))))
    assert all(v.dtype == torch.float32 for v in w.values())
    assert max((w[k] - base[k]).abs().max() for k in w) > 1e-5


def test_bench_memory_sharding_halves_the_state_per_process():
    """`diffalign bench memory --sharding`'s measurement: the digits UNet's parameters, gradients and
    AdamW state per process, 2 FSDP processes against one (goal <= 0.55x; padding makes it >= 0.5x)."""
    from diffalign.bench.memory import bench_sharding

    config = str(Path(__file__).parents[1] / "configs" / "ddpo_digits.yaml")
    rows = bench_sharding({"digits": (config, ["lora.enabled=false", "train.batches_per_epoch=1", "args.minibatches=1",
                                               "sampling.num_steps=4", "eval.reward=null"])})["rows"]
    one, dp, fsdp = rows
    assert (one["processes"], dp["sharding"], fsdp["sharding"]) == (1, "none", "fsdp")
    assert one["total"] == dp["total"] and one["parameters"] > 2e6  # the UNet's 652k fp32 weights, whole
    assert one["gradients"] == one["parameters"] and one["optimizer"] >= 2 * one["parameters"]
    assert 0.5 <= fsdp["vs_one_process"] <= 0.55


def test_sharded_checkpoint_resumes_in_one_process(tmp_path):
    """A sharded checkpoint loads into another process count: a 2-process FSDP run cut back to its
    first checkpoint (later files deleted, as a crash would leave it) resumes with one process,
    unsharded, and ends with the uninterrupted run's weights up to rounding."""
    import shutil

    cfg = _yaml(tmp_path, DIGITS, sharding="fsdp", keep_checkpoints=10)
    _torchrun("train", str(cfg), "--out", str(tmp_path / "full"), port=29575)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for late in ("final", "summary.json", "checkpoints/epoch-000002"):
        shutil.rmtree(tmp_path / "cut" / late) if (tmp_path / "cut" / late).is_dir() else (tmp_path / "cut" / late).unlink()
    from diffalign.run_folder import open_run

    run = open_run(tmp_path / "cut")
    cfg_one, args = resolve_config(tmp_path / "cut" / "config.yaml")
    s = train(cfg_one, args, tmp_path / "cut", resume=True)
    assert s["processes"] == 1 and run.checkpoint.name == "epoch-000001"
    assert_same_up_to_rounding(_unet(tmp_path / "full"), _unet(tmp_path / "cut"), lr=1e-4, steps=2)


def test_fsdp_on_sd3_and_with_a_network_the_method_holds(sd3, tmp_path):
    """GRPO fully fine-tuning a tiny SD3 transformer (per transformer block) with its frozen reference
    copy sharded, and constrained training with a distillation constraint (its starting model is the
    run's reference copy, sharded too; μ stays whole): both match two data-parallel processes, and
    the SD3 run's final/ loads with from_pretrained."""
    from diffusers import StableDiffusion3Pipeline

    grpo = {"method": "grpo", "model": sd3, "reward": "ink", "prompts": ["a cat", "a dog"], "sampling": {"num_steps": 4},
            "lora": {"enabled": False}, "optim": {"lr": 1e-4}, "args": {"group_size": 2},
            "train": {"batch_size": 4, "batches_per_epoch": 1, "epochs": 1}, "eval": {"reward": None, "per_prompt": 2}}
    constrained = {"method": "constrained", "model": "digits", "reward": "ink", "prompts": ["3"],
                   "sampling": {"num_steps": 4, "guidance_scale": 1.0}, "optim": {"lr": 1e-3},
                   "train": {"epochs": 1, "batch_size": 8, "batches_per_epoch": 2},
                   "eval": {"reward": None, "per_prompt": 2},
                   "args": {"data": "digits:classes=3:count=20",
                            "constraints": [{"data": "samples:8", "kind": "distill", "bound": 0.01}]}}
    for i, spec in enumerate((grpo, constrained)):
        _torchrun("train", str(_yaml(tmp_path, spec, f"dp{i}.yaml")), "--out", str(tmp_path / f"dp{i}"), port=29576 + 2 * i)
        r = _torchrun("train", str(_yaml(tmp_path, spec, f"f{i}.yaml", sharding="fsdp")), "--out",
                      str(tmp_path / f"fsdp{i}"), port=29577 + 2 * i)
        sub = "transformer" if i == 0 else "unet"
        a, b = (load_file(str(tmp_path / run / "final" / sub / "diffusion_pytorch_model.safetensors"))
                for run in (f"dp{i}", f"fsdp{i}"))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "sharded denoiser, reference copy;" in r.stdout and "the method's own state (bounds, counters, mu" in r.stdout
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "fsdp0" / "final")
    b = load_file(str(tmp_path / "fsdp0" / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(pipe.transformer.state_dict()["pos_embed.proj.weight"], b["pos_embed.proj.weight"])


def test_fsdp_nft_anchor_is_sharded_swapped_and_resumed(tmp_path):
    """nft's anchor (the old policy) is a second copy of the trained weights: under FSDP it is laid out
    in the parameters' shards and copied into them in place, so the gathered forward sees it. Full
    fine-tune of the digits UNet over 3 epochs: 2 FSDP processes give 2 data-parallel processes' weights
    up to rounding, and resuming from the sharded checkpoint of epoch 2 (the anchor gathered whole into
    method.safetensors, resharded on load) ends with the uninterrupted run's weights, bit for bit."""
    import shutil

    spec = dict(DIGITS, method="nft", args={"group_size": 2, "minibatches": 2, "decay_rate": 0.3},
                train=dict(DIGITS["train"], epochs=3, keep_checkpoints=10))
    _torchrun("train", str(_yaml(tmp_path, spec, "dp.yaml")), "--out", str(tmp_path / "dp"), port=29583)
    _torchrun("train", str(_yaml(tmp_path, spec, "fsdp.yaml", sharding="fsdp")), "--out", str(tmp_path / "fsdp"),
              port=29584)
    dp, fsdp = _unet(tmp_path / "dp"), _unet(tmp_path / "fsdp")
    assert_same_up_to_rounding(dp, fsdp, lr=1e-4, steps=6)
    anchor = load_file(str(tmp_path / "fsdp" / "checkpoints" / "epoch-000002" / "method.safetensors"))
    anchor = {k.removeprefix("state.anchor."): v for k, v in anchor.items()}
    assert anchor.keys() == fsdp.keys() and all(anchor[k].shape == fsdp[k].shape for k in fsdp), "saved whole"
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "fsdp", crashed)
    shutil.rmtree(crashed / "checkpoints" / "epoch-000003")
    shutil.rmtree(crashed / "final")
    (crashed / "summary.json").unlink()
    r = _torchrun("train", "--resume", str(crashed), port=29585)
    assert "resuming" in r.stdout
    b = _unet(crashed)
    for k in fsdp:
        assert torch.equal(fsdp[k], b[k]), k


def test_fsdp_on_a_flux_folder(flux, tmp_path):
    """GRPO fully fine-tuning a tiny FLUX transformer (its double- and single-stream blocks sharded, the
    reference copy too) matches two data-parallel processes; final/ loads with FluxPipeline.from_pretrained."""
    from diffusers import FluxPipeline

    spec = {"method": "grpo", "model": flux, "reward": "ink", "prompts": ["a cat", "a dog"],
            "pipeline": {"resolution": 32}, "sampling": {"num_steps": 4}, "lora": {"enabled": False},
            "optim": {"lr": 1e-4}, "args": {"group_size": 2},
            "train": {"batch_size": 4, "batches_per_epoch": 1, "epochs": 1}, "eval": {"reward": None, "per_prompt": 2}}
    _torchrun("train", str(_yaml(tmp_path, spec, "dp.yaml")), "--out", str(tmp_path / "dp"), port=29591)
    r = _torchrun("train", str(_yaml(tmp_path, spec, "f.yaml", sharding="fsdp")), "--out", str(tmp_path / "fsdp"),
                  port=29592)
    assert "sharded denoiser, reference copy;" in r.stdout
    a, b = (load_file(str(tmp_path / run / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
            for run in ("dp", "fsdp"))
    base = load_file(str(Path(flux) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(b[k], base[k]) for k in base)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    pipe = FluxPipeline.from_pretrained(tmp_path / "fsdp" / "final")
    key = "x_embedder.weight"
    assert torch.equal(pipe.transformer.state_dict()[key], b[key])
