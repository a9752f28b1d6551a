"""Stable Diffusion 3 (SD3 / SD3.5 class) pipeline folders as a `DiffusionModel`.

`model: /path/to/stable-diffusion-3-medium-diffusers` loads the folder's SD3Transformer2DModel,
AutoencoderKL, the two CLIP text encoders (with projection) and, when the folder has it, T5,
with `local_files_only=True` and safetensors weights. A folder without T5 (model_index.json
lists `text_encoder_3` as null) is read as the SD3 pipeline reads it with `text_encoder_3=None`:
zeros in place of the T5 tokens.

- `encode_prompts`: the pipeline's own `encode_prompt` (diffusers' code, on a pipeline built
  from the loaded parts), cached per prompt. Its two outputs are packed into one tensor per
  prompt, as the model interface needs: `cat([prompt_embeds.flatten(1), pooled], 1)`;
  `forward` unpacks them for the transformer.
- `null_condition`: the negative prompt ('' by default) for classifier-free guidance.
- `decode`: latents / scaling_factor + shift_factor -> VAE decoder -> images in [0, 1];
  `encode_images` is its inverse ((mean - shift_factor) x scaling_factor).
- The scheduler is the folder's `FlowMatchEulerDiscreteScheduler`: the transformer's output
  is the velocity, and timesteps are the scheduler's floats (sigma x 1000), passed to the
  transformer as they are (as the pipeline does). A scheduler with dynamic shifting is fixed to
  the resolution as the pipeline fixes it (`flow.image_shift`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import register_pipeline
from .base import DiffusionModel, zero_output
from .sd import check_folder, image_size, latent_model, read_parts, scheduler_from_folder

WEIGHTS = (("config.json",), ("diffusion_pytorch_model.safetensors",))
TEXT = (("config.json",), ("model.safetensors", "model.safetensors.index.json"))
TOKENIZER = (("tokenizer_config.json",), ("vocab.json", "tokenizer.json", "spiece.model"))
PARTS = {"transformer": WEIGHTS, "vae": WEIGHTS, "text_encoder": TEXT, "tokenizer": TOKENIZER,
         "text_encoder_2": TEXT, "tokenizer_2": TOKENIZER, "scheduler": (("scheduler_config.json",),)}
T5_PARTS = {"text_encoder_3": TEXT, "tokenizer_3": TOKENIZER}
# the joint attention's image and text projections (diffusers' SD3 LoRA scripts adapt the same)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
GUIDANCE_SCALE = 7.0
NUM_INFERENCE_STEPS = 28
MAX_SEQUENCE_LENGTH = 256  # T5 tokens (the pipeline's default)


def has_t5(folder: Path) -> bool:
    index = json.loads((folder / "model_index.json").read_text())
    return (index.get("text_encoder_3") or [None])[0] is not None


def load_scheduler(folder: Path, overrides: dict | None = None, image_seq_len: int | None = None):
    """The folder's flow scheduler with the `pipeline.scheduler` overrides; one with dynamic shifting is fixed to
    the image's token count (`flow.image_shift`, μ as the SD3 pipeline computes it; the transformer's default
    size when not given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..flow import image_shift

    scheduler = scheduler_from_folder(FlowMatchEulerDiscreteScheduler, folder, overrides)
    if image_seq_len is None:
        c = json.loads((folder / "transformer" / "config.json").read_text())
        image_seq_len = (c["sample_size"] // c["patch_size"]) ** 2
    return image_shift(scheduler, image_seq_len)[0]


@register_pipeline("StableDiffusion3Pipeline", scheduler=load_scheduler)
def load_pipeline(path, resolution: int | None = None, negative_prompt: str = "",
                  scheduler: dict | None = None) -> DiffusionModel:
    """Load a local SD3 pipeline folder (see the module docstring); `scheduler` overrides settings of the
    folder's scheduler config (`pipeline.scheduler`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(path).expanduser()
    t5 = has_t5(folder)
    check_folder(folder, {**PARTS, **(T5_PARTS if t5 else {})}, "Stable Diffusion 3 pipeline", "make-tiny-sd3")
    networks = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
                "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
                **({"text_encoder_3": T5EncoderModel} if t5 else {})}
    parts = read_parts(folder, networks, ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if t5 else ()))
    parts.setdefault("text_encoder_3", None)  # no T5: zeros in place of its tokens, as the pipeline does
    size, factor = image_size(parts["transformer"], parts["vae"], resolution)
    tokens = (size // factor // parts["transformer"].config.patch_size) ** 2
    return build(folder, parts, load_scheduler(folder, scheduler, tokens), resolution, negative_prompt)


def field_net(transformer) -> torch.nn.Module:
    """A one-layer zero-output transformer with `transformer`'s inputs and outputs."""
    from diffusers import SD3Transformer2DModel

    c = transformer.config
    net = SD3Transformer2DModel(sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                                out_channels=c.out_channels, num_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=c.joint_attention_dim,
                                caption_projection_dim=32, pooled_projection_dim=c.pooled_projection_dim,
                                pos_embed_max_size=c.pos_embed_max_size)
    return zero_output(net)


def build(folder: Path, parts: dict, scheduler, resolution: int | None = None,
          negative_prompt: str = "") -> DiffusionModel:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(scheduler=scheduler, **{"tokenizer_3": None, **parts})
    pipe.set_progress_bar_config(disable=True)
    transformer, vae = parts["transformer"], parts["vae"]
    width, pooled_width = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim

    def encode(prompts: list[str]) -> torch.Tensor:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe.text_encoder.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_SEQUENCE_LENGTH)
        return torch.cat([embeds.flatten(1), pooled], 1)

    def forward(denoiser, x, t, cond):
        embeds, pooled = cond[:, :-pooled_width], cond[:, -pooled_width:]
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=embeds.reshape(len(cond), -1, width),
                        pooled_projections=pooled, return_dict=False)[0]

    return latent_model(
        folder, transformer, vae, scheduler, encode, lambda: pipe.text_encoder.device, resolution, negative_prompt,
        lambda side: field_net(transformer), shift=vae.config.shift_factor or 0.0,
        forward=forward,
        lora_targets=list(LORA_TARGETS),
        guidance_scale=GUIDANCE_SCALE,
        num_inference_steps=NUM_INFERENCE_STEPS,
        parts={k: v for k, v in parts.items() if isinstance(v, torch.nn.Module) and k != "transformer"},
        pipeline={"name": "StableDiffusion3Pipeline", "component": "transformer",
                  "t5": parts["text_encoder_3"] is not None, "pipe": pipe},
    )
