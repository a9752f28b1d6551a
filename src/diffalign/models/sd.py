"""Stable Diffusion (1.x / 2.x class) pipeline folders as a `DiffusionModel`.

`model: /path/to/stable-diffusion-v1-5` in a config loads the folder's UNet2DConditionModel,
AutoencoderKL, CLIP text encoder and tokenizer with `local_files_only=True` (never the
network) and safetensors weights. The diffusion runs in the VAE's latent space:

- `encode_prompts`: tokenizer (padded to its max length) -> text encoder's last hidden
  state, (B, 77, D); cached per prompt, since the text encoder is frozen.
- `null_condition`: the negative prompt ('' by default) for classifier-free guidance.
- `decode`: latents / scaling_factor -> VAE decoder -> images in [0, 1]; differentiable.
- `encode_images`: images -> VAE encoder's mean x scaling_factor (offline feedback data).
- The scheduler is the folder's config loaded as diffusers' `DDIMScheduler` (eta > 0 gives
  the Gaussian policy the likelihood methods need), with the config's `pipeline.scheduler`
  settings over it. A folder whose last DDIM step is deterministic (`set_alpha_to_one: true`,
  the `DDIMScheduler()` default, or `steps_offset: 0`) has no likelihood there: likelihood
  methods refuse it when the config is read (`deterministic_steps`), naming the settings
  that fix it without editing the folder.

The sample resolution is the model's default (UNet sample_size x the VAE's factor) unless
`pipeline.resolution` overrides it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import register_pipeline
from .base import DiffusionModel, ModelFolderError, PipelineInfo, zero_output

PARTS = {  # subfolder -> files it must hold (any one of each tuple)
    "unet": (("config.json",), ("diffusion_pytorch_model.safetensors",)),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors",)),
    "text_encoder": (("config.json",), ("model.safetensors",)),
    "tokenizer": (("tokenizer_config.json",), ("vocab.json", "tokenizer.json")),
    "scheduler": (("scheduler_config.json",),),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GUIDANCE_SCALE = 7.5
NUM_INFERENCE_STEPS = 50


def check_folder(folder: Path, parts: dict = PARTS, kind: str = "Stable Diffusion pipeline",
                 tiny: str = "make-tiny-sd") -> None:
    """Raise `ModelFolderError` naming every missing subfolder or file."""
    missing = []
    for sub, needs in parts.items():
        for options in needs:
            if not any((folder / sub / f).is_file() for f in options):
                missing.append(f"{sub}/{' or '.join(options)}")
    if missing:
        raise ModelFolderError(
            f"{str(folder)!r} is an incomplete {kind} folder: missing {', '.join(missing)}. Save one with "
            "`pipe.save_pretrained(folder, safe_serialization=True)` (weights must be .safetensors), or make a "
            f"tiny test folder with `diffalign models {tiny} OUT`")


def cached_prompts(encode: Callable[[list[str]], torch.Tensor], device: Callable[[], torch.device]):
    """`encode_prompts` over `encode(prompts) -> (B, ...)`, cached per (prompt, device) as float32:
    the text encoders are frozen, so a prompt is encoded once."""
    cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def encode_prompts(prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        where = device()
        todo = [p for p in dict.fromkeys(prompts) if (p, where) not in cache]
        if todo:
            for p, h in zip(todo, encode(todo).float()):
                cache[(p, where)] = h
        return torch.stack([cache[(p, where)] for p in prompts])

    return encode_prompts


def vae_codec(vae, size: int, scale: float, shift: float = 0.0):
    """`decode(latents) -> images in [0, 1]` (differentiable) and its inverse `encode_images`
    (images of any size -> the VAE encoder's mean), with latents = (z - shift) x scale."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode((latents / scale + shift).to(vae.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            latents = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents.float() - shift) * scale

    return decode, encode_images


def image_size(denoiser, vae, size: int | None) -> tuple[int, int]:
    """(image size, VAE factor): `size`, or the denoiser's default sample size x the factor."""
    factor = vae_factor(vae)
    size = size or denoiser.config.sample_size * factor
    if size % factor:
        raise ValueError(f"pipeline.resolution = {size} is not a multiple of the VAE's factor {factor}")
    return size, factor


def scheduler_from_folder(cls, folder: Path, overrides: dict | None = None):
    """The folder's scheduler config as `cls`, with `overrides` (the config's `pipeline.scheduler`) applied;
    a key the scheduler does not take is an error that names it."""
    import inspect

    config = dict(cls.load_config(folder, subfolder="scheduler"))
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ValueError(f"config key 'pipeline.scheduler.{key}': {cls.__name__} has no setting {key!r} "
                             f"(it takes {', '.join(sorted(known))})")
        config[key] = value
    return cls.from_config(config)


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_scheduler(folder: Path, overrides: dict | None = None):
    """The folder's scheduler config as diffusers' `DDIMScheduler`, with the `pipeline.scheduler` overrides."""
    from diffusers import DDIMScheduler

    return scheduler_from_folder(DDIMScheduler, folder, overrides)


def read_parts(folder: Path, networks: dict[str, type], tokenizers: tuple[str, ...] = ()) -> dict:
    """The folder's networks (`{subfolder: class}`: safetensors, local files only, frozen) and tokenizers,
    by subfolder."""
    from transformers import AutoTokenizer

    local = dict(local_files_only=True, use_safetensors=True)
    parts = {sub: cls.from_pretrained(folder, subfolder=sub, **local) for sub, cls in networks.items()}
    for sub in tokenizers:
        parts[sub] = AutoTokenizer.from_pretrained(folder / sub, local_files_only=True)
    for sub in networks:
        parts[sub].eval().requires_grad_(False)
    return parts


def latent_model(folder: Path, denoiser, vae, scheduler, encode: Callable[[list[str]], torch.Tensor],
                 device: Callable[[], torch.device], resolution: int | None, negative_prompt: str,
                 field_net: Callable[[int], torch.nn.Module], shift: float = 0.0, pipeline: dict | None = None,
                 size: tuple[int, int] | None = None, channels: int | None = None, **fields) -> DiffusionModel:
    """A pipeline folder's `DiffusionModel` in `vae`'s latent space, at `resolution` (None = the denoiser's
    default): prompts through `encode(prompts)` (cached per prompt), the negative prompt as the null condition,
    `field_net(latent side)` for a second field. `fields` are the rest (forward, LoRA targets, defaults,
    parts); `pipeline` holds the `PipelineInfo` fields besides the resolution and the negative prompt; `size`
    (image side, VAE factor) and `channels` (the latent's) when the denoiser's config does not give them."""
    size, factor = size or image_size(denoiser, vae, resolution)
    side = size // factor
    decode, encode_images = vae_codec(vae, size, vae.config.scaling_factor, shift)
    encode_prompts = cached_prompts(encode, device)
    return DiffusionModel(
        name=str(folder),
        denoiser=denoiser,
        scheduler=scheduler,
        sample_shape=(channels or denoiser.config.in_channels, side, side),
        encode_prompts=encode_prompts,
        decode=decode,
        null_condition=lambda n: encode_prompts([negative_prompt] * n),
        prompts=[],  # a pipeline has no prompt set of its own: the config names one
        path=str(folder),
        image_encoder=encode_images,
        make_field_net=lambda: field_net(side),
        pipeline=PipelineInfo(resolution=size, negative_prompt=negative_prompt, **(pipeline or {})),
        **fields,
    )


@register_pipeline("StableDiffusionPipeline", scheduler=load_scheduler)
def load_pipeline(path, resolution: int | None = None, negative_prompt: str = "",
                  scheduler: dict | None = None) -> DiffusionModel:
    """Load a local SD 1.x/2.x pipeline folder (see the module docstring); `scheduler` overrides settings of
    the folder's scheduler config (`pipeline.scheduler`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(path).expanduser()
    check_folder(folder)
    parts = read_parts(folder, {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel},
                       ("tokenizer",))
    return build(folder, parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                 load_scheduler(folder, scheduler), resolution, negative_prompt)


def field_net(unet, text_encoder, side: int) -> torch.nn.Module:
    """A small zero-output UNet with `unet`'s inputs and outputs, conditioned on the text encoder's states."""
    from diffusers import UNet2DConditionModel

    net = UNet2DConditionModel(sample_size=side, in_channels=unet.config.in_channels,
                               out_channels=unet.config.out_channels, layers_per_block=1,
                               block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                               cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8)
    return zero_output(net)


def build(folder: Path, unet, vae, text_encoder, tokenizer, scheduler, resolution: int | None = None,
          negative_prompt: str = "") -> DiffusionModel:
    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        return text_encoder(ids)[0]

    def forward(denoiser, x, t, cond):
        return denoiser(x, t, encoder_hidden_states=cond).sample

    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").exists() else {}
    return latent_model(
        folder, unet, vae, scheduler, encode, lambda: text_encoder.device, resolution, negative_prompt,
        lambda side: field_net(unet, text_encoder, side),
        forward=forward,
        lora_targets=list(LORA_TARGETS),
        guidance_scale=GUIDANCE_SCALE,
        num_inference_steps=NUM_INFERENCE_STEPS,
        parts={"vae": vae, "text_encoder": text_encoder},
        pipeline={"name": index.get("_class_name", "StableDiffusionPipeline"), "tokenizer": tokenizer},
    )
