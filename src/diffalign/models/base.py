"""The model interface every method sees.

A `DiffusionModel` bundles a denoiser, a diffusers scheduler and the two ends of
the pipeline: prompts -> condition tensor, final sample -> image. Nothing here
assumes pixel space or class labels, so a latent text-to-image model (Stable
Diffusion: text encoder in `encode_prompts`, VAE in `decode` / `image_encoder`)
fits the same interface.

Contract:
- `denoiser(x, t, cond)` is called through `predict_noise`, which returns the
  model's raw output (read by the scheduler's `prediction_type`: noise for
  'epsilon', velocity for 'v_prediction', x0 for 'sample').
- `cond` is a tensor (or None) whose first dimension is the batch.
- `null_condition(n)` is the unconditional input for classifier-free guidance,
  or None when the model is unconditional (then guidance is off).
- `decode(x0)` maps a final sample to what rewards see: images float NCHW in
  [0, 1] (for the 2-D toy, points (N, 2)). Differentiable.
- `encode_images(images)` is its inverse, for training on given images
  (offline feedback): pixel space 2·img − 1 by default, a VAE for latent models.
- `eval_space()` describes where diversity and Fréchet distance are measured
  (`EvalSpace`), or None.
- `make_field_net()` builds a fresh small network with the denoiser's inputs (called
  through `forward`, like the denoiser) and the sample's shape as output, its output
  layer zero-initialised: a second learned field beside the denoiser (∇-GFlowNet's
  residual flow g_φ). None when the model has none.
- `parts` holds every other module (VAE, text encoder); `to()` moves them all.
- `lora_targets` names the modules peft adapts by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn


class ModelFolderError(FileNotFoundError):
    """A model folder is missing or incomplete; the message names what is missing."""


@dataclass
class EvalSpace:
    """Where a model's samples are compared with each other and with real data."""

    name: str
    features: Callable[[torch.Tensor], torch.Tensor]  # decoded samples -> (N, d)
    real: Callable[[], torch.Tensor] | None = None  # real data, decoded like samples; None = no Fréchet distance
    classes: Callable[[torch.Tensor], torch.Tensor] | None = None  # decoded samples -> (N,) labels
    num_classes: int = 0
    description: str = ""
    # extra(images, reward, beta) -> dict of further metrics (toy2d: distance to the exact optimum)
    extra: Callable[..., dict] | None = None


@dataclass
class PipelineInfo:
    """What a model loaded from a diffusers pipeline folder carries beyond its parts: for `diffalign export`
    and for the reference loops that run the pipeline itself on the same components."""

    name: str  # the diffusers pipeline class, e.g. 'StableDiffusionPipeline'
    resolution: int  # image side in pixels
    component: str = "unet"  # the denoiser's folder in the pipeline ('transformer': SD3)
    negative_prompt: str = ""
    tokenizer: object = None  # SD 1.x/2.x: the CLIP tokenizer (the pipeline is rebuilt from the parts)
    t5: bool = False  # SD3: the folder has its T5 encoder
    pipe: object = None  # the diffusers pipeline on the same components, once built


@dataclass
class DiffusionModel:
    name: str
    denoiser: nn.Module
    scheduler: object  # diffusers DDIMScheduler / DDPMScheduler
    sample_shape: tuple[int, ...]
    encode_prompts: Callable[[Sequence[str]], torch.Tensor | None]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    null_condition: Callable[[int], torch.Tensor | None] = lambda n: None
    prompts: list[str] = field(default_factory=list)  # default training / evaluation prompts
    lora_targets: list[str] = field(default_factory=list)
    guidance_scale: float = 1.0
    num_inference_steps: int = 20
    path: str | None = None  # folder the weights were loaded from
    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # images -> samples; None = pixel space
    eval_space: Callable[[], EvalSpace | None] = lambda: None
    make_field_net: Callable[[], nn.Module] | None = None  # fresh small net: denoiser's inputs, zero output
    parts: dict[str, nn.Module] = field(default_factory=dict)  # other modules (VAE, text encoder, ...)
    pipeline: PipelineInfo | None = None  # set for a model loaded from a diffusers pipeline folder
    info: dict = field(default_factory=dict)  # anything else a model keeps (toy2d: its mixture)
    # guidance-distilled models (FLUX.1-dev): (cond, scale) -> cond with the guidance scale the denoiser takes as an
    # input written into it; the sampler then applies it instead of classifier-free guidance. None = CFG models.
    embedded_guidance: Callable[[torch.Tensor, float], torch.Tensor] | None = None

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Raw denoiser output for a batch; `t` is a scalar or (B,) tensor of timesteps."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.forward(self.denoiser, x, t.to(x.device), cond)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images [0, 1] -> the model's sample space (the inverse of `decode`).

        `image_encoder` when the model has one (latent models: the VAE); otherwise pixel
        space x = 2·img − 1, resized to `sample_shape` if needed."""
        if self.image_encoder is not None:
            return self.image_encoder(images)
        x = images * 2 - 1
        shape = tuple(self.sample_shape)
        if tuple(x.shape[1:]) != shape:
            if x.ndim != 4 or x.shape[1] != shape[0]:
                raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit model '{self.name}', which "
                                 f"samples {shape}")
            x = torch.nn.functional.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
        return x

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "DiffusionModel":
        """Move the denoiser and every other part of the model."""
        self.denoiser.to(device)
        for part in self.parts.values():
            part.to(device)
        return self


def zero_output(net: nn.Module) -> nn.Module:
    """Zero the weights and bias of `net`'s last Linear/Conv layer, so it outputs 0 at initialisation."""
    last = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return net
