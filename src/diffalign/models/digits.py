"""The embedded `digits` model: a small class-conditional UNet2DModel on 8x8 digits.

Classes 0..9 are the digits, class 10 is the null (unconditional) class used for
classifier-free guidance; about 12% of training labels are dropped to it. The empty
prompt '' asks for the null class (unconditional sampling).
Images live in [-1, 1] inside the diffusion; `decode` maps them back to [0, 1].

The first `load()` pretrains the model on the digits train split (about two
minutes on two CPU cores) and caches it with `cached_dir('digits', DEFAULT_CONFIG, ...)`;
later calls load the cached folder (`embedded.py` does both, for every embedded model).
The folder layout is the usual diffusers one:

    <folder>/unet/       UNet2DModel.save_pretrained (config.json + safetensors)
    <folder>/scheduler/  DDIMScheduler.save_pretrained (FlowMatchEulerDiscreteScheduler for digits-flow)

so `load_from_folder(path)` also loads a user's own fine-tuned copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from ..data import digits as digits_data
from . import pretraining
from .base import DiffusionModel, EvalSpace, zero_output
from .embedded import Embedded

NULL_CLASS = 10
NUM_CLASSES = 11  # 0..9 + null

DEFAULT_CONFIG: dict = {
    "version": 2,  # 2: diffusers' EMAModel and warm-up + cosine schedule (1: hand-written, one step shifted)
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,  # the mid block has one self-attention layer (4x4 tokens)
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "steps_offset": 1,  # inference timesteps 951, 901, ..., 1: the final DDIM step keeps a nonzero std
    "label_dropout": 0.12,
    "steps": 200,
    "batch_size": 128,
    "lr": 2e-3,
    "warmup": 50,
    "weight_decay": 0.0,
    "ema_decay": 0.995,
    "seed": 0,
    "threads": 1,  # one intra-op thread: barely slower than two on an idle 2-core box, far more robust when the CPU is shared
}

# a second, smaller class- and time-conditioned UNet for learned fields beside the denoiser
FIELD_NET_CONFIG: dict = {**DEFAULT_CONFIG, "block_out_channels": [16, 32], "norm_num_groups": 8, "attention_head_dim": 8}

GUIDANCE_SCALE = 2.0
NUM_INFERENCE_STEPS = 20
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


def make_scheduler(config: dict = DEFAULT_CONFIG):
    return pretraining.make_scheduler(config)


def make_unet(config: dict = DEFAULT_CONFIG):
    return UNet2DModel(
        sample_size=config["sample_size"],
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(config["block_out_channels"]),
        down_block_types=tuple(config["down_block_types"]),
        up_block_types=tuple(config["up_block_types"]),
        layers_per_block=config["layers_per_block"],
        norm_num_groups=config["norm_num_groups"],
        attention_head_dim=config["attention_head_dim"],
        add_attention=True,
        num_class_embeds=NUM_CLASSES,
    )


def to_model_space(images: torch.Tensor, sample_size: int) -> torch.Tensor:
    """[0,1] images (N,1,8,8) -> [-1,1] tensors at the model's resolution."""
    x = images * 2 - 1
    if sample_size != x.shape[-1]:
        x = F.interpolate(x, size=(sample_size, sample_size), mode="bilinear", align_corners=False)
    return x


def forward(net, x, t, labels):
    return net(x, t, class_labels=labels).sample


def training_batches(config: dict):
    """batch(generator) -> (x0, labels): random train-split images, about `label_dropout` of the labels
    dropped to the null class (for classifier-free guidance); with `rotate_degrees` each image is first
    turned by an angle uniform in ±rotate_degrees (in [0, 1] space, so the corners fill with background)."""
    images, labels = digits_data.load("train")
    x0_all = to_model_space(images, config["sample_size"])
    bs = config["batch_size"]
    spread = config.get("rotate_degrees", 0)

    def batch(g):
        idx = torch.randint(0, x0_all.shape[0], (bs,), generator=g)
        y = labels[idx].clone()
        y[torch.rand(bs, generator=g) < config["label_dropout"]] = NULL_CLASS  # for CFG
        if spread:
            angles = (2 * torch.rand(bs, generator=g) - 1) * spread
            return to_model_space(digits_data.rotate(images[idx], angles), config["sample_size"]), y
        return x0_all[idx], y

    return batch


def pretrain(out_dir, config: dict = DEFAULT_CONFIG, progress: bool = True) -> dict:
    """Train the UNet from scratch on the digits train split and save it to `out_dir`
    (EMA weights to `out_dir/unet`, the scheduler to `out_dir/scheduler`); returns stats."""
    return DIGITS.pretrain(out_dir, config, progress)


def _build_model(folder: Path, unet, scheduler, name: str = "digits") -> DiffusionModel:
    unet.eval().requires_grad_(False)
    size = unet.config.sample_size

    def device() -> torch.device:
        return next(unet.parameters()).device

    def encode_prompts(prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        labels = [NULL_CLASS if not p.strip() else digits_data.parse_digit(p) for p in prompts]  # '' = unconditional
        return torch.tensor(labels, dtype=torch.long, device=device())

    def null_condition(n: int) -> torch.Tensor:
        return torch.full((n,), NULL_CLASS, dtype=torch.long, device=device())

    def decode(x0: torch.Tensor) -> torch.Tensor:
        img = (x0.clamp(-1, 1) + 1) / 2
        if img.shape[-1] != 8:
            img = F.adaptive_avg_pool2d(img, (8, 8))
        return img

    return DiffusionModel(
        name=name,
        denoiser=unet,
        scheduler=scheduler,
        sample_shape=(1, size, size),
        encode_prompts=encode_prompts,
        forward=forward,
        decode=decode,
        null_condition=null_condition,
        prompts=[str(d) for d in range(10)],
        lora_targets=list(LORA_TARGETS),
        guidance_scale=GUIDANCE_SCALE,
        num_inference_steps=NUM_INFERENCE_STEPS,
        path=str(folder),
        eval_space=eval_space,
        make_field_net=lambda: zero_output(make_unet(FIELD_NET_CONFIG)),
        info={"null_class": NULL_CLASS, "decode_size": (8, 8)},
    )


def eval_space() -> EvalSpace:
    """Diversity and Fréchet distance in the held-out classifier's 128-d penultimate features
    (the stand-in for DreamSim/Inception, independent of the training reward's network);
    real data = all 1,797 scikit-learn digits; classes = the held-out classifier's argmax."""
    from ..rewards import digits as rd

    def classes(images):
        with torch.no_grad():
            net = rd.load_classifier(heldout=True, device=images.device)
            return net(rd.prepare(images)).argmax(-1)

    return EvalSpace("digits", lambda x: rd.features(x, heldout=True), lambda: digits_data.load("all")[0], classes, 10,
                     "held-out classifier penultimate features (128-d)")


def _check(unet) -> str | None:
    if unet.config.num_class_embeds != NUM_CLASSES or unet.config.in_channels != 1:
        return f"need in_channels=1, num_class_embeds={NUM_CLASSES}"
    return None


DIGITS = Embedded("digits", "unet", UNet2DModel, make_unet, training_batches, forward, _build_model, _check)


def load_from_folder(path) -> DiffusionModel:
    """Load a digits model saved as `<path>/unet` + `<path>/scheduler` (e.g. your own fine-tune)."""
    return DIGITS.from_folder(path)


REWARDS = {"reward": "classifier", "eval_reward": "classifier_heldout"}  # a second, independently trained network
load = DIGITS.register("digits", "class-conditional UNet2DModel on scikit-learn's 8x8 handwritten digits "
                       "(pretrained on first use)", DEFAULT_CONFIG, **REWARDS)

# The same UNet trained as a rectified flow (velocity v = ε − x0, `diffalign.flow`); more steps,
# since a flow is sampled by 20 Euler steps of its ODE/SDE rather than DDIM's exact jumps.
FLOW_CONFIG: dict = {**DEFAULT_CONFIG, "version": 1, "objective": "flow", "steps": 600}
load_flow = DIGITS.register("digits-flow", "the digits UNet trained as a rectified flow (flow matching, SD3-style; "
                            "pretrained on first use)", FLOW_CONFIG, **REWARDS)

# The same UNet trained on digits turned by a random angle in ±45°, a base model to align back to upright
# (Kawata et al.'s DDO orientation experiment, arXiv 2502.02954): its training reward is the angle judge
# (`upright`), its held-out reward still the held-out digit classifier.
ROTATED_CONFIG: dict = {**DEFAULT_CONFIG, "rotate_degrees": 45}
load_rotated = DIGITS.register("digits-rotated", "the digits UNet pretrained on digits rotated by up to ±45° "
                               "(for DDO's orientation experiment: align it back to upright; pretrained on first use)",
                               ROTATED_CONFIG, reward="upright", eval_reward="classifier_heldout")
