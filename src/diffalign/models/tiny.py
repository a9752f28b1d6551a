"""Tiny, randomly initialised stand-ins for real models, built locally with no download.

- `make_tiny_sd(out)`: a complete Stable Diffusion pipeline folder (UNet2DConditionModel,
  AutoencoderKL, CLIPTextModel, CLIP tokenizer, DDIM scheduler) that
  `StableDiffusionPipeline.from_pretrained(out)` and diffalign's `model: out` both load.
  32x32 images, 4x8x8 latents: every method runs on it on a CPU in seconds.
- `make_tiny_sd3(out)`: a complete Stable Diffusion 3 pipeline folder (SD3Transformer2DModel,
  AutoencoderKL with SD3's 16 latent channels and shift factor, two CLIPTextModelWithProjection,
  a T5EncoderModel unless `t5=False`, their tokenizers, FlowMatchEulerDiscreteScheduler with
  shift 3) that `StableDiffusion3Pipeline.from_pretrained(out)` and `model: out` both load.
- `make_tiny_flux(out)`: a complete FLUX.1 pipeline folder (FluxTransformer2DModel with the
  guidance embedding of FLUX.1-dev unless `guidance=False` (schnell-like), AutoencoderKL with
  FLUX's 16 channels, scale and shift, CLIPTextModel + T5EncoderModel and their tokenizers,
  FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting) that `FluxPipeline.from_pretrained(out)`
  and `model: out` both load. FluxPipeline's own default size is 128 latent tokens a side: pass
  `pipeline.resolution: 32` (2x2-packed 8x8 latents, 16 tokens) to keep it tiny.
- `make_tiny_clip(out)`: a `CLIPModel` + `CLIPProcessor` folder, the layout the CLIP-based
  rewards (`clip-score`, `pickscore`, `aesthetic`) and `eval.features` read.

The tokenizers are written by the project: CLIP's is a byte-level BPE vocabulary of the 256
byte symbols (alone and word-final) and no merges, so any text tokenises, one symbol per byte;
T5's is a unigram vocabulary of the printable ASCII characters (alone and word-initial).
The weights are random: these folders test loading, shapes, gradients and export, not
image quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import atomic_dir

TEXT_DIM = 32
MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer(folder: str | Path):
    """Write a CLIP tokenizer (vocab.json + merges.txt, then `save_pretrained`) into `folder`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = folder / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=MAX_LENGTH)
    tok.save_pretrained(str(folder))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return tok


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_DIM,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def make_tiny_sd(out: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """Write a tiny random Stable Diffusion pipeline folder to `out` (atomically)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=resolution)
    latent = resolution // 4
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    out = Path(out)
    with atomic_dir(out) as tmp:
        tok = write_tokenizer(Path(tmp) / "tokenizer")
        text = CLIPTextModel(_text_config(len(tok)))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def write_t5_tokenizer(folder: str | Path):
    """Write a T5 tokenizer (a unigram vocabulary built in memory, `save_pretrained`) into `folder`."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.save_pretrained(str(folder))
    return tok


def make_tiny_sd3(out: str | Path, seed: int = 0, resolution: int = 32, t5: bool = True) -> Path:
    """Write a tiny random Stable Diffusion 3 pipeline folder to `out` (atomically); `t5=False`
    leaves out the T5 text encoder (the pipeline then gives zeros in its place, as SD3 allows)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=resolution,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)  # SD3's VAE: 16 channels, its scale and shift
    joint = 2 * TEXT_DIM  # the two CLIPs' hidden states side by side (T5's width too)
    transformer = SD3Transformer2DModel(sample_size=resolution // 4, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=joint, caption_projection_dim=32,
                                        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    out = Path(out)
    with atomic_dir(out) as tmp:
        toks = [write_tokenizer(Path(tmp) / name) for name in ("tokenizer", "tokenizer_2")]
        clips = [CLIPTextModelWithProjection(_text_config(len(tok))) for tok in toks]
        tok3 = text3 = None
        if t5:
            tok3 = write_t5_tokenizer(Path(tmp) / "tokenizer_3")
            text3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=joint, d_kv=8, d_ff=64, num_layers=1,
                                            num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clips[0],
                                        tokenizer=toks[0], text_encoder_2=clips[1], tokenizer_2=toks[1],
                                        text_encoder_3=text3, tokenizer_3=tok3)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def make_tiny_flux(out: str | Path, seed: int = 0, guidance: bool = True) -> Path:
    """Write a tiny random FLUX.1 pipeline folder to `out` (atomically): the guidance embedding (FLUX.1-dev)
    unless `guidance=False` (FLUX.1-schnell's layout)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)  # FLUX's VAE: 16 channels, its scale and shift
    t5_width = 2 * TEXT_DIM
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=t5_width,
                                         pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)  # FLUX.1's scheduler config
    out = Path(out)
    with atomic_dir(out) as tmp:
        tok = write_tokenizer(Path(tmp) / "tokenizer")
        tok2 = write_t5_tokenizer(Path(tmp) / "tokenizer_2")
        clip = CLIPTextModel(_text_config(len(tok)))
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=t5_width, d_kv=8, d_ff=64, num_layers=1,
                                     num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok,
                            text_encoder_2=t5, tokenizer_2=tok2)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def make_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random `CLIPModel` + `CLIPProcessor` folder to `out` (atomically)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    out = Path(out)
    with atomic_dir(out) as tmp:
        tok = write_tokenizer(tmp)
        vision = CLIPVisionConfig(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=image_size, patch_size=8, projection_dim=TEXT_DIM)
        config = CLIPConfig(text_config=_text_config(len(tok)).to_dict(), vision_config=vision.to_dict(),
                            projection_dim=TEXT_DIM)
        CLIPModel(config).save_pretrained(tmp, safe_serialization=True)
        images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                  "width": image_size})
        CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(tmp)
    return out
