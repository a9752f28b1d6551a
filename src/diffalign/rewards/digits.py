"""Rewards for the 8x8 digits: two classifiers, ink, compressibility.

Images are float (N, 1, 8, 8) in [0, 1]; (N, 1, H, W) of another size is
adaptive-average-pooled to 8x8 (and (N, 3, H, W) is averaged over channels).
Prompts name the digit ('3', 'a handwritten 3'), parsed by
`diffalign.data.digits.parse_digit`.

The two networks are trained on the fixed 'train' split on first use (a few
seconds on one CPU core, fixed seeds) and cached as safetensors under
the cache entry `reward-classifier-<hash>`; their 'test'-split accuracy is printed
when trained and stored next to the weights (`classifier_metrics`).

- `classifier` (`DigitCNN`): conv3x3(1->32) - conv3x3(32->32) - avgpool2 -
  conv3x3(32->64) - dropout - linear(1024->128) - dropout - linear(128->10),
  SiLU activations (smooth, so reward gradients are informative), seed 0.
- `classifier_heldout` (`DigitMLP`): an MLP 64 -> 256 -> 128 -> 10 with GELU
  and dropout, seed 1: a different architecture and seed, for evaluation only,
  to catch samples that fool the training reward without looking like digits.

Both are trained with light augmentation (random shifts of up to one pixel,
brightness scaling 0.8-1.2, Gaussian pixel noise with sigma up to 0.1 on half
the batch) and label smoothing 0.05.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import CachedNetwork
from ..data import digits as data_digits
from . import register

__all__ = [
    "DigitCNN",
    "DigitMLP",
    "load_classifier",
    "classifier_metrics",
    "features",
    "prepare",
    "prompt_labels",
]

IMAGE_SIZE = 8
_VERSION = 2  # bump to retrain (changes the cache key)


# ---------------------------------------------------------------- networks

class _Resize8(nn.Module):
    """(N, C, H, W) -> (N, 1, 8, 8): channel mean, then adaptive average pooling if H, W != 8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prepare(x)


class DigitCNN(nn.Module):
    """Small CNN: logits (N, 10) for images (N, 1, 8, 8) in [0, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.resize = _Resize8()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Dropout(0.25),
            nn.Linear(64 * 4 * 4, 128), nn.SiLU(), nn.Dropout(0.25),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.resize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitMLP(nn.Module):
    """MLP on the 64 pixels: logits (N, 10) for images (N, 1, 8, 8) in [0, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.resize = _Resize8()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.2),
            nn.Linear(256, 128), nn.GELU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.resize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_CONFIGS = {
    False: {"version": _VERSION, "role": "classifier", "arch": "DigitCNN", "seed": 0, "epochs": 30,
            "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64, "label_smoothing": 0.05,
            "augment": {"shift": 1, "brightness": [0.8, 1.2], "noise_sigma": 0.1, "noise_frac": 0.5}},
    True: {"version": _VERSION, "role": "classifier_heldout", "arch": "DigitMLP", "seed": 1, "epochs": 100,
           "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64, "label_smoothing": 0.05,
           "augment": {"shift": 1, "brightness": [0.8, 1.2], "noise_sigma": 0.1, "noise_frac": 0.5}},
}
_ARCHS = {"DigitCNN": DigitCNN, "DigitMLP": DigitMLP}


# ---------------------------------------------------------------- input handling

def prepare(images: torch.Tensor) -> torch.Tensor:
    """Check and bring images to (N, 1, 8, 8) float: channel mean, adaptive avg pooling."""
    if not torch.is_tensor(images):
        raise TypeError(f"digits rewards need a tensor of images (N, 1, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"digits rewards need images of shape (N, 1, H, W) (or (N, 3, H, W)), got {tuple(images.shape)}"
        )
    x = images if images.is_floating_point() else images.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.adaptive_avg_pool2d(x, IMAGE_SIZE)
    return x


def prompt_labels(prompts, device=None) -> torch.Tensor:
    """Digit named by each prompt, as a long tensor (N,)."""
    return torch.tensor([data_digits.parse_digit(str(p)) for p in prompts], dtype=torch.long, device=device)


# ---------------------------------------------------------------- training

def _augment(x: torch.Tensor, aug: dict, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    s = int(aug["shift"])
    if s:
        p = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=g)
        idx = torch.arange(IMAGE_SIZE)
        rows = (dy[:, None] + idx[None])[:, :, None]
        cols = (dx[:, None] + idx[None])[:, None, :]
        x = p[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    lo, hi = aug["brightness"]
    x = x * (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g))
    sigma = aug["noise_sigma"] * torch.rand(n, 1, 1, 1, generator=g)
    sigma = sigma * (torch.rand(n, 1, 1, 1, generator=g) < aug["noise_frac"])
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net(x).argmax(1) == y).float().mean().item()


def _train(config: dict) -> tuple[nn.Module, dict]:
    """Train a classifier from scratch. Runs with gradients on whatever the caller's mode: the
    first use of a reward may come from inside `torch.no_grad()` (e.g. evaluation features)."""
    with torch.enable_grad():
        return _train_with_grad(config)


def _train_with_grad(config: dict) -> tuple[nn.Module, dict]:
    seed = int(config["seed"])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = _ARCHS[config["arch"]]()
    x_train, y_train = data_digits.load("train")
    x_test, y_test = data_digits.load("test")
    bs = int(config["batch_size"])
    steps_per_epoch = (len(x_train) + bs - 1) // bs
    opt = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], total_steps=config["epochs"] * steps_per_epoch)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny network: threading overhead dominates
    try:
        for _ in range(config["epochs"]):
            net.train()
            perm = torch.randperm(len(x_train), generator=g)
            for i in range(0, len(x_train), bs):
                b = perm[i:i + bs]
                logits = net(_augment(x_train[b], config["augment"], g))
                loss = F.cross_entropy(logits, y_train[b], label_smoothing=config["label_smoothing"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        noisy = (x_test + 0.1 * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(123))).clamp(0, 1)
        metrics = {
            "test_accuracy": _accuracy(net, x_test, y_test),
            "test_accuracy_noise0.1": _accuracy(net, noisy, y_test),
            "train_accuracy": _accuracy(net, x_train, y_train),
            "train_seconds": round(time.time() - t0, 2),
            "n_train": len(x_train),
            "n_test": len(x_test),
        }
    finally:
        torch.set_num_threads(threads)
    return net, metrics


def _describe(config: dict):
    def line(metrics: dict) -> str:
        text = (f"[diffalign] trained reward network {config['role']!r} ({config['arch']}) in "
                f"{metrics['train_seconds']:.1f}s: test accuracy {100 * metrics['test_accuracy']:.1f}% "
                f"({metrics['n_test']} test digits)")
        if metrics["test_accuracy"] < 0.97:
            text += f"\n[diffalign] WARNING: {config['role']} test accuracy is below 97%"
        return text

    return line


_NETS = {h: CachedNetwork("reward-classifier", c, _ARCHS[c["arch"]], _train, _describe(c)) for h, c in _CONFIGS.items()}


def classifier_metrics(heldout: bool = False) -> dict:
    """Metrics measured when the network was trained (test_accuracy, ...)."""
    return _NETS[bool(heldout)].metrics()


def load_classifier(heldout: bool = False, device="cpu") -> nn.Module:
    """The trained digit classifier (held-out one if `heldout`), eval mode, frozen.

    Returns logits (N, 10) for images (N, 1, 8, 8) in [0, 1] (other sizes are
    pooled to 8x8); `net.features(x)` gives the penultimate (N, 128) features.
    Trains it first (seconds) if it is not cached yet. Each call returns a new
    module, so modifying it does not affect the rewards.
    """
    return _NETS[bool(heldout)].load(device)


@torch.no_grad()
def features(images: torch.Tensor, heldout: bool = True, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate (N, 128) features of the held-out classifier (default) for e.g. FID; no grad."""
    net = _NETS[bool(heldout)].on(images.device)
    x = prepare(images)
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------- rewards

def _classifier_reward(heldout: bool, device):
    nets = _NETS[bool(heldout)]
    nets.on(device)  # trained or loaded now, not at the first query

    def fn(images, prompts, metadata=None):
        x = prepare(images)
        net = nets.on(x.device)
        labels = prompt_labels(prompts, device=x.device)
        logits = net(x)
        logp = torch.log_softmax(logits.float(), dim=1)
        rewards = logp.gather(1, labels[:, None]).squeeze(1)
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).float()
        return rewards, {"accuracy": correct.mean().item() if len(correct) else float("nan")}

    fn.differentiable = True
    return fn


@register(
    "classifier",
    description="log p(prompted digit | image) under a small CNN trained on the digits train split "
    "(<= 0; 0 = certain); info['accuracy'] = fraction classified as the prompted digit",
    differentiable=True,
)
def _classifier(device="cpu"):
    return _classifier_reward(False, device)


@register(
    "classifier_heldout",
    description="log p(prompted digit | image) under an independently trained MLP (different "
    "architecture and seed) for evaluation, to catch reward hacking of 'classifier'; "
    "info['accuracy'] as for 'classifier'",
    differentiable=True,
)
def _classifier_heldout(device="cpu"):
    return _classifier_reward(True, device)


@register(
    "ink",
    description="stroke mass: mean pixel intensity of the image clamped to [0, 1] "
    "(range [0, 1]; real digits average about 0.31); an aesthetic-score stand-in",
    differentiable=True,
)
def _ink(device="cpu"):
    def fn(images, prompts, metadata=None):
        x = prepare(images)
        rewards = x.clamp(0.0, 1.0).mean(dim=(1, 2, 3))
        return rewards, {}

    fn.differentiable = True
    return fn


def png_bytes(image: np.ndarray) -> int:
    """Size in bytes of a uint8 (H, W) or (H, W, 3) array encoded as PNG (Pillow, compress_level 9)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=9)
    return buf.tell()


@register(
    "compressibility",
    description="minus the PNG size (Pillow, compress_level 9) in kilobytes (1 kB = 1000 bytes) of the "
    "8-bit image at its own resolution (at 8x8: about -0.07 blank, -0.12 a real digit, -0.14 uniform noise; JPEG is "
    "pointless at 8x8); not differentiable",
    differentiable=False,
)
def _compressibility(device="cpu", scale_bytes: float = 1000.0):
    return _png_size_reward(-1.0, scale_bytes, "compressibility")


@register(
    "incompressibility",
    description="the PNG size (Pillow, compress_level 9) in kilobytes of the 8-bit image at its own resolution "
    "(minus `compressibility`); not differentiable",
    differentiable=False,
)
def _incompressibility(device="cpu", scale_bytes: float = 1000.0):
    return _png_size_reward(1.0, scale_bytes, "incompressibility")


def _png_size_reward(sign: float, scale_bytes: float, who: str):
    def fn(images, prompts, metadata=None):
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{who} needs images (N, 1 or 3, H, W), got {shape}")
        x = images.detach().float().clamp(0.0, 1.0)
        arr = (x * 255.0).round().to(torch.uint8).cpu().numpy()
        sizes = []
        for img in arr:
            img = img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
            sizes.append(png_bytes(img))
        sizes_t = torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return sign * sizes_t / scale_bytes, {"png_bytes_mean": float(np.mean(sizes)) if sizes else float("nan")}

    fn.differentiable = False
    return fn
