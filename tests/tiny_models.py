"""Tiny randomly initialised models for fast tests of the core (no pretraining)."""

import torch
from diffusers import DDIMScheduler
from torch import nn

from diffalign.models import register_model
from diffalign.models.base import DiffusionModel


class TinyDenoiser(nn.Module):
    """eps(x, t, c) for x of shape (B, 1, 4, 4), c a class label in 0..3 (3 = null)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 16)
        self.inp = nn.Linear(16 + 1, 32)
        self.mid = nn.Linear(32 + 16, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x, t, c):
        h = torch.cat([x.flatten(1), (t.float() / 1000).unsqueeze(1)], dim=1)
        h = torch.tanh(self.inp(h))
        h = torch.tanh(self.mid(torch.cat([h, self.emb(c)], dim=1)))
        return self.out(h).view_as(x)


def tiny_model(seed=0, **scheduler_kwargs):
    torch.manual_seed(seed)
    net = TinyDenoiser()
    kw = dict(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    kw.update(scheduler_kwargs)
    return DiffusionModel(
        name="tiny",
        denoiser=net,
        scheduler=DDIMScheduler(**kw),
        sample_shape=(1, 4, 4),
        encode_prompts=lambda ps: torch.tensor([int(p) for p in ps]),
        forward=lambda d, x, t, c: d(x, t, c),
        decode=lambda x: (x.clamp(-1, 1) + 1) / 2,
        null_condition=lambda n: torch.full((n,), 3, dtype=torch.long),
        prompts=["0", "1", "2"],
        lora_targets=["inp", "mid", "out"],
        guidance_scale=2.0,
        num_inference_steps=10,
    )


@register_model("tiny-test", "tests only: tiny random class-conditional model on 4x4 images (no pretraining)")
def load_tiny(progress: bool = True):
    """Registered by importing this file: a model the package knows nothing about, used by name."""
    return tiny_model()
