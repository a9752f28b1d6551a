"""Adjoint Matching on a 1-D Gaussian base tilted by a Gaussian reward: how fast its samples reach the exact optimum.

    python scripts/am_gaussian.py                      # the table in docs/results/adjoint-matching.md (about 10 min)
    python scripts/am_gaussian.py --steps 10 --epochs 60 200

Base N(0.5, 0.6²) with its exact flow velocity (plus a trained residual, zero at the start: the network of
tests/test_adjoint.py), reward r(x) = −(x − 1.5)² / (2·0.6²), β = 1: the optimum p_base·exp(r) is N(1.0, 0.424²).
A linear reward only shifts the mean (the test's exact tilt); this one also narrows the distribution, which the
regression must learn as a contraction of the steps' means. For each grid size (sampling steps) and training
length (epochs of 256 memoryless paths, one optimizer step each, lr 3e-3), the mean and std of 20,000 samples
of the aligned model on the memoryless sampler it trains, against the optimum and the base on the same grid.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

CENTRE, WIDTH2, MU, S2 = 1.5, 0.36, 0.5, 0.36
OPT_VAR = 1 / (1 / S2 + 1 / WIDTH2)
OPT_MEAN = OPT_VAR * (MU / S2 + CENTRE / WIDTH2)


def make_gaussian_reward(device="cpu"):
    def fn(images, prompts, metadata=None):
        return -(images.flatten(1).sum(dim=1) - CENTRE) ** 2 / (2 * WIDTH2), {}

    fn.differentiable = True
    return fn


def run(steps: int, epochs: int, seed: int = 0, n: int = 20000) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from test_adjoint import ExactGaussian

    import custom_reward
    import diffalign.context as context
    from diffalign.models.base import DiffusionModel
    from diffalign.sampler import Sampler
    from diffalign.train import resolve_config, train

    custom_reward.make_gaussian_reward = make_gaussian_reward
    made = []

    def gaussian(*_, **__):
        made.append(DiffusionModel(name="gauss1d", denoiser=ExactGaussian(MU, math.sqrt(S2)),
                                   scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                                   sample_shape=(1,), encode_prompts=lambda p: None,
                                   forward=lambda net, x, t, c: net(x, t), decode=lambda x: x, prompts=[""]))
        return made[-1]

    context.load_model = gaussian
    cfg, args = resolve_config(base={
        "method": "adjoint-matching", "model": "gauss1d", "reward": "custom_reward:make_gaussian_reward",
        "prompts": [""], "lora": {"enabled": False}, "sampling": {"num_steps": steps}, "seed": seed,
        "optim": {"lr": 3e-3}, "train": {"epochs": epochs, "batch_size": 256, "batches_per_epoch": 1},
        "eval": {"reward": None, "per_prompt": 2}})
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(sys.stderr):
        train(cfg, args, Path(d) / "run")
    model = made[0]
    sampler = Sampler(num_steps=steps, eta=math.sqrt(2), sde_steps=tuple(range(steps - 1)))
    with torch.no_grad():
        x = sampler.sample(model, [""] * n, generator=torch.Generator().manual_seed(5), with_logprob=False).final
        for p in model.denoiser.residual.parameters():
            p.zero_()
        base = sampler.sample(model, [""] * n, generator=torch.Generator().manual_seed(5), with_logprob=False).final
    return {"steps": steps, "epochs": epochs, "seed": seed, "mean": float(x.mean()), "std": float(x.std()),
            "base_std": float(base.std())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--epochs", type=int, nargs="+", default=[200, 800])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(f"optimum: mean {OPT_MEAN:.3f}, std {math.sqrt(OPT_VAR):.3f}\n")
    print("| steps | epochs | mean | std | std / optimum's | base std on this grid |\n|---|---|---|---|---|---|")
    for steps in a.steps:
        for epochs in a.epochs:
            r = run(steps, epochs, a.seed)
            print(f"| {steps} | {epochs} | {r['mean']:.3f} | {r['std']:.3f} | {r['std'] / math.sqrt(OPT_VAR):.3f} | "
                  f"{r['base_std']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
