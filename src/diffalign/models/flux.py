"""FLUX.1 class pipeline folders (`FluxPipeline`: FLUX.1-dev, FLUX.1-schnell and fine-tunes of them) as a
`DiffusionModel`.

`model: /path/to/FLUX.1-dev` loads the folder's FluxTransformer2DModel, AutoencoderKL, the CLIP text
encoder (its pooled output) and T5 (its token states), with `local_files_only=True` and safetensors weights.

- Samples are the VAE's latents as they are, (16, H/8, W/8); `forward` packs them into the transformer's
  2x2 patch tokens with their image ids (`FluxPipeline._pack_latents`, `_prepare_latent_image_ids`) and
  unpacks its output, so the flow SDE and its log-probs act on the same numbers as the pipeline's
  scheduler (a bijective reshape).
- `encode_prompts`: the pipeline's own `encode_prompt` (T5 states, pooled CLIP), cached per prompt and
  packed as `cat([t5.flatten(1), pooled, guidance])`; the text ids are zeros, as the pipeline makes them.
- Guidance: FLUX.1-dev is guidance-distilled — the guidance scale is an input of the transformer (its
  guidance embedding), not classifier-free guidance. `sampling.guidance_scale` is written into the
  condition's last column (`embedded_guidance`; default 3.5, the pipeline's) and there is no CFG.
  Folders without the guidance embedding (schnell) sample without guidance by default (scale 1);
  a scale above 1 there is CFG against the negative prompt (FluxPipeline's `true_cfg_scale`).
  `null_condition` is the negative prompt's condition ('' by default), for the methods that train an
  unconditional input.
- The scheduler's dynamic shifting is fixed to the image size as the pipeline fixes it: μ from the packed
  token count (`flow.image_shift`).
- `decode`: latents / scaling_factor + shift_factor -> VAE decoder -> images in [0, 1].

The default resolution is the pipeline's (128 latent tokens a side x the VAE's factor: 1024 px for
FLUX.1); `pipeline.resolution` sets another (a multiple of twice the VAE's factor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import register_pipeline
from .base import DiffusionModel, zero_output
from .sd import check_folder, latent_model, read_parts, scheduler_from_folder, vae_factor
from .sd3 import TEXT, TOKENIZER, WEIGHTS

PARTS = {"transformer": WEIGHTS, "vae": WEIGHTS, "text_encoder": TEXT, "tokenizer": TOKENIZER,
         "text_encoder_2": TEXT, "tokenizer_2": TOKENIZER, "scheduler": (("scheduler_config.json",),)}
# the attention projections of the double-stream blocks (image and text) and the single-stream blocks
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
GUIDANCE_SCALE = 3.5  # FluxPipeline's default guidance (embedded)
NUM_INFERENCE_STEPS = 28
MAX_SEQUENCE_LENGTH = 512  # T5 tokens (the pipeline's default)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latent tokens a side before packing x 2 / 2


def resolution_of(folder: Path, resolution: int | None) -> tuple[int, int]:
    """(image side, VAE factor): `resolution` or the pipeline's default, checked against the 2x2 packing."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    size = resolution or DEFAULT_SAMPLE_SIZE * factor
    if size % (2 * factor):
        raise ValueError(f"pipeline.resolution = {size} is not a multiple of {2 * factor} (the VAE's factor {factor} "
                         "x FLUX's 2x2 latent packing)")
    return size, factor


def load_scheduler(folder: Path, overrides: dict | None = None, resolution: int | None = None):
    """The folder's flow scheduler (with the `pipeline.scheduler` overrides), its dynamic shifting fixed to the
    packed token count of `resolution` (default: the pipeline's) as `FluxPipeline` computes μ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..flow import image_shift

    size, factor = resolution_of(folder, resolution)
    tokens = (size // factor // 2) ** 2
    return image_shift(scheduler_from_folder(FlowMatchEulerDiscreteScheduler, folder, overrides), tokens)[0]


@register_pipeline("FluxPipeline", scheduler=load_scheduler)
def load_pipeline(path, resolution: int | None = None, negative_prompt: str = "",
                  scheduler: dict | None = None) -> DiffusionModel:
    """Load a local FLUX.1 pipeline folder (see the module docstring); `scheduler` overrides settings of the
    folder's scheduler config (`pipeline.scheduler`). A guidance-distilled model has no use for a negative
    prompt: a non-empty one is an error."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    folder = Path(path).expanduser()
    check_folder(folder, PARTS, "FLUX pipeline", "make-tiny-flux")
    parts = read_parts(folder, {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL,
                                "text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel},
                       ("tokenizer", "tokenizer_2"))
    if negative_prompt and parts["transformer"].config.guidance_embeds:
        raise ValueError("pipeline.negative_prompt: this FLUX model is guidance-distilled (guidance goes into the "
                         "transformer, no classifier-free guidance), so a negative prompt has no effect; remove it")
    size, _ = resolution_of(folder, resolution)
    return build(folder, parts, load_scheduler(folder, scheduler, size), size, negative_prompt)


def field_net(transformer) -> torch.nn.Module:
    """A one-block zero-output FLUX transformer with `transformer`'s inputs and outputs."""
    from diffusers import FluxTransformer2DModel

    c = transformer.config
    net = FluxTransformer2DModel(patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels,
                                 num_layers=1, num_single_layers=0, attention_head_dim=16, num_attention_heads=2,
                                 joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
                                 guidance_embeds=c.guidance_embeds, axes_dims_rope=(4, 6, 6))
    return zero_output(net)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 · w/2, 4C) patch tokens, as `FluxPipeline._pack_latents`."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 · w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def build(folder: Path, parts: dict, scheduler, resolution: int, negative_prompt: str = "") -> DiffusionModel:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    transformer = parts["transformer"]
    width, pooled_width = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    guided = bool(transformer.config.guidance_embeds)
    text_end = -pooled_width - (1 if guided else 0)

    def encode(prompts: list[str]) -> torch.Tensor:
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe.text_encoder.device,
                                               max_sequence_length=MAX_SEQUENCE_LENGTH)
        packed = [embeds.flatten(1), pooled]
        if guided:
            packed.append(torch.full((len(prompts), 1), GUIDANCE_SCALE, dtype=pooled.dtype, device=pooled.device))
        return torch.cat(packed, 1)

    def with_guidance(cond: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.cat([cond[:, :-1], torch.full_like(cond[:, -1:], float(scale))], 1)

    def forward(denoiser, x, t, cond):
        b, _, h, w = x.shape
        embeds = cond[:, :text_end].reshape(b, -1, width)
        pooled = cond[:, text_end:][:, :pooled_width]
        guidance = cond[:, -1].float() if guided else None
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        out = denoiser(hidden_states=pack(x), timestep=(t / 1000).to(x.dtype), guidance=guidance,
                       pooled_projections=pooled.to(x.dtype), encoder_hidden_states=embeds.to(x.dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack(out, h, w)

    model = latent_model(
        folder, transformer, parts["vae"], scheduler, encode, lambda: pipe.text_encoder.device, resolution, negative_prompt,
        lambda side: field_net(transformer), shift=parts["vae"].config.shift_factor or 0.0,
        forward=forward,
        lora_targets=list(LORA_TARGETS),
        guidance_scale=GUIDANCE_SCALE if guided else 1.0,
        num_inference_steps=NUM_INFERENCE_STEPS,
        parts={k: v for k, v in parts.items() if isinstance(v, torch.nn.Module) and k != "transformer"},
        pipeline={"name": "FluxPipeline", "component": "transformer", "t5": True, "pipe": pipe},
        embedded_guidance=with_guidance if guided else None,
        size=(resolution, vae_factor(parts["vae"])), channels=transformer.config.in_channels // 4,
    )
    return model
