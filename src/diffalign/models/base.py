"""The model interface every method sees.

A `DiffusionModel` bundles a noise-predicting denoiser, a diffusers scheduler and
the two ends of the pipeline: prompts -> condition tensor, final sample -> image.
Nothing here assumes pixel space or class labels, so a latent text-to-image model
(Stable Diffusion: text encoder in `encode_prompts`, VAE in `decode`) fits the same
interface.

Contract:
- `denoiser(x, t, cond)` is called through `predict_noise`, which returns the
  model's raw output (noise prediction for `prediction_type='epsilon'`).
- `cond` is a tensor (or None) whose first dimension is the batch.
- `null_condition(n)` is the unconditional input for classifier-free guidance,
  or None when the model is unconditional (then guidance is off).
- `decode(x0)` maps a final sample to what rewards see: images float NCHW in
  [0, 1] (for the 2-D toy, points (N, 2)). Differentiable.
- `lora_targets` names the modules peft adapts by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn


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
    info: dict = field(default_factory=dict)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Raw denoiser output for a batch; `t` is a scalar or (B,) tensor of timesteps."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.forward(self.denoiser, x, t.to(x.device), cond)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "DiffusionModel":
        self.denoiser.to(device)
        return self
