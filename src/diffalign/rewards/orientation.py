"""The angle judge: how far an 8x8 digit is turned from upright (for the `digits-rotated` model).

A small network regresses the angle in degrees (counter-clockwise positive, as
`diffalign.data.digits.rotate` turns) of a digit image. It is trained on first use on the
digits train split, every image turned by an angle uniform in ±60° and moved by up to half a
pixel (so upright images are interpolated too: the judge cannot read the angle off the blur),
with the classifiers' brightness and noise augmentation; fixed seeds, a few seconds on one
core. It is cached as safetensors under `cached_dir('reward-angle', ...)` with its test-split
error (`judge_metrics`: mean absolute error in degrees on test digits turned by known angles).

- `upright`: −|angle| / 45 (0 upright, −1 at 45°), differentiable; the judge is `DigitMLP`'s
  layers with one output (seed 0).
- `upright_heldout`: the same from a second judge, `DigitCNN`'s layers with one output (seed 1),
  to catch samples that fool the first.
- `predict_angle(images)`: the predicted angle in degrees, for evaluation.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import CachedNetwork
from ..data import digits as data_digits
from . import register
from .digits import DigitCNN, DigitMLP, _augment, prepare

__all__ = ["judge_metrics", "load_judge", "predict_angle"]

MAX_DEGREES = 60.0  # training angles are uniform in ±MAX_DEGREES; the network's output is in units of it
UPRIGHT_SCALE = 45.0  # `upright` = −|angle| / UPRIGHT_SCALE: −1 at the edge of digits-rotated's ±45°

_AUGMENT = {"shift": 0, "brightness": [0.8, 1.2], "noise_sigma": 0.1, "noise_frac": 0.5}
# The MLP is the training judge: on this global task it beats the CNN (measured: 3.2° against 6° test error at
# 80 and 20-30 epochs) and trains faster (about 5 s against 8 s on one core).
_CONFIGS = {
    False: {"version": 1, "role": "angle", "arch": "DigitMLP", "seed": 0, "epochs": 80, "lr": 2e-3,
            "weight_decay": 1e-4, "batch_size": 64, "max_degrees": MAX_DEGREES, "max_shift": 0.5, "augment": _AUGMENT},
    True: {"version": 1, "role": "angle_heldout", "arch": "DigitCNN", "seed": 1, "epochs": 30, "lr": 2e-3,
           "weight_decay": 1e-4, "batch_size": 64, "max_degrees": MAX_DEGREES, "max_shift": 0.5, "augment": _AUGMENT},
}
_ARCHS = {"DigitCNN": DigitCNN, "DigitMLP": DigitMLP}


def make_judge(arch: str) -> nn.Module:
    """A digits classifier's layers with one output: the angle / MAX_DEGREES."""
    net = _ARCHS[arch]()
    net.head = nn.Linear(net.feature_dim, 1)
    return net


def turned(images: torch.Tensor, max_degrees: float, g: torch.Generator, max_shift: float = 0.0):
    """(images turned by angles uniform in ±max_degrees and moved by up to max_shift pixels, the angles)."""
    n = images.shape[0]
    angles = (2 * torch.rand(n, generator=g) - 1) * max_degrees
    shift = (2 * torch.rand(n, 2, generator=g) - 1) * max_shift if max_shift else None
    return data_digits.rotate(images, angles, shift), angles


# ---------------------------------------------------------------- training

def train_judge(config: dict) -> tuple[nn.Module, dict]:
    """Train a judge from scratch on the train split; (network, test metrics). Runs with gradients
    whatever the caller's mode (a first use may come from inside `torch.no_grad()`)."""
    with torch.enable_grad():
        return _train(config)


def _train(config: dict) -> tuple[nn.Module, dict]:
    torch.manual_seed(config["seed"])
    g = torch.Generator().manual_seed(config["seed"])
    net = make_judge(config["arch"])
    x_train, _ = data_digits.load("train")
    bs, scale = config["batch_size"], config["max_degrees"]
    steps = config["epochs"] * ((len(x_train) + bs - 1) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], total_steps=steps)
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny network: threading overhead dominates
    try:
        net.train()
        for _ in range(config["epochs"]):
            perm = torch.randperm(len(x_train), generator=g)
            for i in range(0, len(x_train), bs):
                x, angles = turned(x_train[perm[i:i + bs]], scale, g, config["max_shift"])
                loss = F.mse_loss(net(_augment(x, config["augment"], g)).squeeze(1), angles / scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        metrics = {**test_errors(net, scale), "train_seconds": round(time.time() - t0, 2)}
    finally:
        torch.set_num_threads(threads)
    return net, metrics


@torch.no_grad()
def test_errors(net: nn.Module, scale: float = MAX_DEGREES) -> dict:
    """Mean absolute error (degrees) on the test split turned by known angles in ±scale (fixed seed),
    and the mean |predicted angle| of the test digits as they are (the judge's reading of upright)."""
    x_test, _ = data_digits.load("test")
    x, angles = turned(x_test, scale, torch.Generator().manual_seed(123))
    err = (net(x).squeeze(1) * scale - angles).abs()
    return {"test_mae_degrees": float(err.mean()), "test_median_error_degrees": float(err.median()),
            "test_upright_abs_degrees": float((net(x_test).squeeze(1) * scale).abs().mean()), "n_test": len(x_test)}


def _describe(config: dict):
    return lambda metrics: (f"[diffalign] trained reward network {config['role']!r} ({config['arch']}) in "
                            f"{metrics['train_seconds']:.1f}s: test error {metrics['test_mae_degrees']:.1f}° "
                            f"({metrics['n_test']} test digits turned by up to ±{config['max_degrees']:.0f}°)")


_JUDGES = {h: CachedNetwork("reward-angle", c, lambda arch=c["arch"]: make_judge(arch), train_judge, _describe(c))
           for h, c in _CONFIGS.items()}


def judge_metrics(heldout: bool = False) -> dict:
    """Metrics measured when the judge was trained (test_mae_degrees, ...)."""
    return _JUDGES[bool(heldout)].metrics()


def load_judge(heldout: bool = False, device="cpu") -> nn.Module:
    """The trained angle judge (the held-out one if `heldout`), eval mode, frozen: angle / MAX_DEGREES (N, 1)
    for images (N, 1, 8, 8) in [0, 1]. Trains it first (seconds) if it is not cached yet."""
    return _JUDGES[bool(heldout)].load(device)


def _judge(heldout: bool, device) -> nn.Module:
    return _JUDGES[bool(heldout)].on(device)


def angle(images: torch.Tensor, heldout: bool = False) -> torch.Tensor:
    """Predicted angle in degrees (N,), differentiable in the images."""
    x = prepare(images)
    return _judge(heldout, x.device)(x).squeeze(1).float() * MAX_DEGREES


@torch.no_grad()
def predict_angle(images: torch.Tensor, heldout: bool = False, batch_size: int = 1024) -> torch.Tensor:
    """Predicted angle in degrees (N,) of images (N, 1, H, W) in [0, 1]; counter-clockwise positive."""
    return torch.cat([angle(images[i:i + batch_size], heldout) for i in range(0, len(images), batch_size)])


# ---------------------------------------------------------------- rewards

def _upright_reward(heldout: bool):
    def fn(images, prompts, metadata=None):
        degrees = angle(images, heldout)
        return -degrees.abs() / UPRIGHT_SCALE, {"abs_angle": float(degrees.detach().abs().mean())}

    fn.differentiable = True
    return fn


@register("upright", description="-|rotation angle| / 45 as a small MLP judge predicts it (0 = upright, -1 = turned "
          "by 45°; trained on digits turned by up to ±60°); info['abs_angle'] = mean |angle| in degrees",
          differentiable=True)
def _upright(device="cpu"):
    _judge(False, device)
    return _upright_reward(False)


@register("upright_heldout", description="'upright' from an independently trained judge (a CNN, other seed) for "
          "evaluation, to catch samples that fool the first; info['abs_angle'] as for 'upright'", differentiable=True)
def _upright_heldout(device="cpu"):
    _judge(True, device)
    return _upright_reward(True)
