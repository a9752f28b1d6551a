"""Rewards for real images, from local weights only (nothing is ever downloaded).

Images are float NCHW in [0, 1], RGB, at any resolution; a 1-channel image is
repeated to 3 channels.

- `jpeg-compressibility` / `jpeg-incompressibility`: minus / plus the JPEG size in kB
  (Pillow, quality 95), DDPO's (in)compressibility rewards. (`compressibility` is the
  digits' PNG version.) Not differentiable.
- `brightness`: mean pixel value in [0, 1]. Differentiable.
- `clip-score(path=CLIP)`: scale · cos(image, text embedding) of a transformers CLIP folder.
- `pickscore(path=PICKSCORE)`: PickScore, logit_scale.exp() · cos (PickScore_v1 is a CLIP
  folder; put the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K in it, or pass `processor=`).
- `aesthetic(path=CLIP, head=FILE.safetensors)`: the LAION aesthetic predictor v2, an MLP
  on the L2-normalised CLIP image embedding (the original uses CLIP ViT-L/14; convert its
  .pth with `convert_aesthetic_head`).
- `hpsv2(path=CHECKPOINT, model=ViT-H-14)`: Human Preference Score v2, cos(image, text)
  of an open_clip model (needs `pip install open_clip_torch`).

A CLIP folder is `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained` in one
folder. The CLIP rewards preprocess in torch, so gradients reach the images: resize the
shortest edge to the processor's size (bicubic, antialiased), centre-crop to its crop
size, normalise with its image_mean / image_std; on images already at the crop size this
is exactly the processor's result. Models load once per (path, device), frozen, in eval mode.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import register

__all__ = ["ClipModel", "load_clip", "clip_folder", "load_aesthetic_head", "convert_aesthetic_head", "rgb",
           "jpeg_bytes"]

CLIP_FILES = ("config.json, model.safetensors (a pytorch_model.bin is not loaded: re-save it with "
              "save_pretrained(safe_serialization=True)), the tokenizer (tokenizer.json, or vocab.json + "
              "merges.txt) and the processor config (preprocessor_config.json or processor_config.json), as written "
              "by CLIPModel.save_pretrained + CLIPProcessor.save_pretrained")
HEAD_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_CACHE: dict[tuple, object] = {}  # (kind, path(s), device) -> loaded model


# ---------------------------------------------------------------- inputs

def rgb(images, who: str) -> torch.Tensor:
    """Check images (N, 1 or 3, H, W) and return them as float RGB (grey repeated)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{who} needs images (N, 1 or 3, H, W) in [0, 1], got {shape}")
    x = images if images.is_floating_point() else images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def resize_crop(x: torch.Tensor, short: int | tuple | None, crop: tuple | None, mean, std) -> torch.Tensor:
    """Resize the shortest edge to `short` (or to (h, w) if a tuple), centre-crop to `crop`, normalise; in torch."""
    h, w = x.shape[-2:]
    if isinstance(short, tuple):
        size = short
    elif short:
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    else:
        size = (h, w)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    if crop is not None and tuple(x.shape[-2:]) != tuple(crop):
        top, left = (x.shape[-2] - crop[0]) // 2, (x.shape[-1] - crop[1]) // 2
        x = x[..., top:top + crop[0], left:left + crop[1]]
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- CLIP (transformers)

def clip_folder(who: str, path, key: str = "path") -> Path:
    """The CLIP folder `path`, checked; errors say how to pass it and what it must hold."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"{who} needs {key}=FOLDER, a local CLIP folder ({CLIP_FILES}); in a config write e.g. "
                         f"'{who}({key}=/models/clip-vit-large-patch14)', in Python build_reward('{who}', {key}=...)")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{who}: CLIP folder {str(folder)!r} does not exist; it must hold {CLIP_FILES}")
    need = {"config.json": ["config.json"], "model.safetensors": ["model.safetensors", "model.safetensors.index.json"],
            "tokenizer.json": ["tokenizer.json", "vocab.json"],
            "preprocessor_config.json": ["preprocessor_config.json", "processor_config.json"]}
    missing = [name for name, options in need.items() if not any((folder / f).is_file() for f in options)]
    if missing:
        raise FileNotFoundError(f"{who}: CLIP folder {str(folder)!r} lacks {', '.join(missing)}; it must hold "
                                f"{CLIP_FILES}")
    return folder


class ClipModel:
    """A frozen transformers CLIPModel with torch preprocessing (differentiable in the images)."""

    def __init__(self, model, processor):
        self.model, self.tokenizer = model, processor.tokenizer
        ip = processor.image_processor
        size, crop = _size(ip.size), _size(ip.crop_size)
        self.short = size if getattr(ip, "do_resize", True) else None
        self.crop = (crop if isinstance(crop, tuple) else (crop, crop)) if getattr(ip, "do_center_crop", True) else None
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (N, d); gradients flow to `images`."""
        x = resize_crop(rgb(images, "CLIP").to(self.device), self.short, self.crop, self.mean, self.std)
        out = self.model.vision_model(pixel_values=x.to(self.model.dtype))
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts) -> torch.Tensor:
        """L2-normalised text embeddings (N, d)."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def cosine(self, images, prompts) -> torch.Tensor:
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def _size(size):
    """A processor size (dict or SizeDict) -> shortest edge (int) or (height, width)."""
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    return int(get("height")), int(get("width"))


def load_clip(path, device="cpu", processor=None, who: str = "clip") -> ClipModel:
    """The CLIP model at `path` (processor files from `processor`, default the same folder), on `device`:
    loaded once per (path, processor, device), frozen, eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    folder = clip_folder(who, path)
    proc = Path(str(processor)).expanduser() if processor else folder
    if not proc.is_dir():
        raise FileNotFoundError(f"{who}: processor folder {str(proc)!r} does not exist; it must hold the tokenizer "
                                "and processor config (CLIPProcessor.save_pretrained)")
    key = ("clip", str(folder.resolve()), str(proc.resolve()), str(torch.device(device)))
    if key not in _CACHE:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        model.eval().requires_grad_(False).to(device)
        _CACHE[key] = ClipModel(model, CLIPProcessor.from_pretrained(str(proc), local_files_only=True))
    return _CACHE[key]


# ---------------------------------------------------------------- aesthetic head

class AestheticHead(nn.Module):
    """LAION aesthetic predictor v2: Linear-Dropout-Linear-Dropout-Linear-Dropout-Linear-Linear."""

    def __init__(self, dims=(768, 1024, 128, 64, 16)):
        super().__init__()
        d = dims
        self.layers = nn.Sequential(nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
                                    nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], 1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def _head_file(who: str, head) -> Path:
    what = (f"a .safetensors file with {', '.join(HEAD_KEYS)} (convert the original sac+logos+ava1-l14-linearMSE.pth "
            "with diffalign.rewards.images.convert_aesthetic_head)")
    if head is None or str(head).strip() == "":
        raise ValueError(f"{who} needs head=FILE, {what}; in a config write e.g. "
                         f"'{who}(path=/models/clip-vit-large-patch14, head=/models/aesthetic.safetensors)'")
    file = Path(str(head)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{who}: head file {str(file)!r} does not exist; it must be {what}")
    return file


def load_aesthetic_head(head, device="cpu", who: str = "aesthetic") -> AestheticHead:
    """The aesthetic MLP from a safetensors file (sizes read from the weights), frozen, eval mode, cached."""
    from safetensors.torch import load_file

    file = _head_file(who, head)
    key = ("head", str(file.resolve()), str(torch.device(device)))
    if key not in _CACHE:
        state = load_file(str(file))
        missing = [k for k in HEAD_KEYS if k not in state]
        if missing:
            raise ValueError(f"{who}: {str(file)!r} lacks {', '.join(missing)}; it must hold {', '.join(HEAD_KEYS)}")
        dims = [state[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)]
        net = AestheticHead(dims)
        net.load_state_dict({k: state[k] for k in HEAD_KEYS})
        _CACHE[key] = net.eval().requires_grad_(False).to(device)
    return _CACHE[key]


def convert_aesthetic_head(pth, out_safetensors) -> Path:
    """Original aesthetic predictor .pth -> safetensors (read with torch.load(weights_only=True))."""
    from safetensors.torch import save_file

    state = torch.load(str(Path(pth).expanduser()), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise ValueError(f"{pth} is not an aesthetic predictor state dict: it lacks {', '.join(missing)}")
    out = Path(out_safetensors).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].float().contiguous() for k in HEAD_KEYS}, str(out))
    return out


# ---------------------------------------------------------------- HPSv2 (open_clip)

class OpenClipModel(ClipModel):
    """A frozen open_clip model with the same torch preprocessing and embeddings as `ClipModel`."""

    def __init__(self, net, tokenizer):
        self.model, self.tokenizer = net, tokenizer
        cfg = getattr(net.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(net.visual, "image_size", 224))
        self.short = size if isinstance(size, int) else tuple(size)
        self.crop = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std = tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_embeds(self, images):
        x = resize_crop(rgb(images, "hpsv2").to(self.device), self.short, self.crop, self.mean, self.std)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts):
        return F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)


def _open_clip():
    try:
        import open_clip
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise ImportError(
            f"reward 'hpsv2' needs open_clip, which cannot be imported here ({type(e).__name__}: {e}). "
            "pip install open_clip_torch, with a torchvision built for your torch (for a CPU torch, torchvision "
            "from the same PyTorch index; a PyPI torchvision pulls a CUDA torch)"
        ) from e
    return open_clip


def load_hpsv2(path, model: str = "ViT-H-14", device="cpu") -> OpenClipModel:
    """open_clip architecture `model` (a built-in name or a model config .json), weights from checkpoint `path`."""
    oc = _open_clip()
    if path is None or str(path).strip() == "":
        raise ValueError("hpsv2 needs path=CHECKPOINT, the HPS v2 weights (e.g. HPS_v2.1_compressed.pt, a state dict "
                         "of open_clip ViT-H-14); in a config write 'hpsv2(path=/models/HPS_v2.1_compressed.pt)'")
    ckpt = Path(str(path)).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"hpsv2: checkpoint {str(ckpt)!r} does not exist; it must be the HPS v2 weights "
                                "(.pt or .safetensors state dict of the open_clip model named by model=)")
    name = str(model)
    if name.endswith(".json"):
        config = Path(name).expanduser()
        if not config.is_file():
            raise FileNotFoundError(f"hpsv2: model config {str(config)!r} does not exist (an open_clip model config "
                                    "JSON, or pass a built-in name like model=ViT-H-14)")
        oc.add_model_config(str(config))
        name = config.stem
    key = ("hpsv2", str(ckpt.resolve()), name, str(torch.device(device)))
    if key not in _CACHE:
        net = oc.create_model(name, pretrained=None, device="cpu")  # the architecture only: nothing is fetched
        if ckpt.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(ckpt))
        else:
            state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        net.eval().requires_grad_(False).to(device)
        _CACHE[key] = OpenClipModel(net, oc.get_tokenizer(name))
    return _CACHE[key]


# ---------------------------------------------------------------- rewards

def jpeg_bytes(image: np.ndarray, quality: int = 95) -> int:
    """Size in bytes of a uint8 (H, W, 3) array encoded as JPEG by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def _jpeg_reward(sign: float, quality: int):
    def fn(images, prompts, metadata=None):
        x = rgb(images, "jpeg rewards").detach().float().clamp(0.0, 1.0)
        arr = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = torch.tensor([jpeg_bytes(np.ascontiguousarray(a), quality) for a in arr], dtype=torch.float32)
        kb = sizes.to(images.device) / 1000.0
        return sign * kb, {"jpeg_kb_mean": float(kb.mean()) if len(arr) else 0.0}

    fn.differentiable = False
    return fn


@register("jpeg-compressibility", differentiable=False,
          description="minus the JPEG size (Pillow, quality 95) in kB (1000 bytes) of the 8-bit RGB image at its own "
          "resolution, as in DDPO (flat images near 0, noise most negative); not differentiable")
def _jpeg_compressibility(device="cpu", quality: int = 95):
    return _jpeg_reward(-1.0, quality)


@register("jpeg-incompressibility", differentiable=False,
          description="the JPEG size (Pillow, quality 95) in kB of the 8-bit RGB image, as in DDPO; not differentiable")
def _jpeg_incompressibility(device="cpu", quality: int = 95):
    return _jpeg_reward(1.0, quality)


@register("brightness", differentiable=True, description="mean pixel value of the RGB image (range [0, 1])")
def _brightness(device="cpu"):
    def fn(images, prompts, metadata=None):
        return rgb(images, "brightness").mean(dim=(1, 2, 3)), {}

    fn.differentiable = True
    return fn


def _clip_reward(name: str, path, processor, device, score):
    built = load_clip(path, device, processor, who=name)  # fail now, not at the first batch

    def fn(images, prompts, metadata=None):
        clip = built if built.device == images.device else load_clip(path, images.device, processor, who=name)
        return score(clip, images, prompts).to(images.device), {}

    fn.differentiable = True
    return fn


@register("clip-score", differentiable=True,
          description="scale * cosine similarity of the CLIP image and prompt embeddings (default scale 1: range "
          "[-1, 1], about 0.2-0.35 for matching pairs; torchmetrics' CLIPScore is 100*max(cos, 0)); path=CLIP folder")
def _clip_score(device="cpu", path=None, processor=None, scale: float = 1.0):
    return _clip_reward("clip-score", path, processor, device, lambda c, x, p: float(scale) * c.cosine(x, p))


@register("pickscore", differentiable=True,
          description="PickScore: logit_scale.exp() * cos(image, prompt) of the PickScore CLIP model (about 100*cos: "
          "~18-23 for real images); path=PickScore_v1 CLIP folder (processor=... if its files are elsewhere)")
def _pickscore(device="cpu", path=None, processor=None):
    return _clip_reward("pickscore", path, processor, device,
                        lambda c, x, p: c.model.logit_scale.exp().float() * c.cosine(x, p))


@register("aesthetic", differentiable=True,
          description="LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding "
          "(about 1-10, ~5-6 for typical photos); path=CLIP folder, head=aesthetic .safetensors")
def _aesthetic(device="cpu", path=None, head=None, processor=None):
    clip = load_clip(path, device, processor, who="aesthetic")
    mlp = load_aesthetic_head(head, device)
    dim, want = clip.model.config.projection_dim, mlp.layers[0].in_features
    if dim != want:
        raise ValueError(f"aesthetic: the head {head!r} takes {want}-d embeddings but the CLIP model at {path!r} gives "
                         f"{dim}-d ones; use the CLIP the head was trained on (LAION's: ViT-L/14, 768-d)")

    def fn(images, prompts, metadata=None):
        c, m = clip, mlp
        if clip.device != images.device:
            c, m = load_clip(path, images.device, processor, who="aesthetic"), load_aesthetic_head(head, images.device)
        return m(c.image_embeds(images)).squeeze(-1).to(images.device), {}

    fn.differentiable = True
    return fn


@register("hpsv2", differentiable=True,
          description="Human Preference Score v2: cos(image, prompt) of the HPS open_clip model (range [-1, 1], "
          "~0.2-0.3); path=checkpoint .pt, model=open_clip name or config .json (default ViT-H-14); needs open_clip")
def _hpsv2(device="cpu", path=None, model: str = "ViT-H-14"):
    built = load_hpsv2(path, model, device)

    def fn(images, prompts, metadata=None):
        net = built if built.device == images.device else load_hpsv2(path, model, images.device)
        return net.cosine(images, prompts).to(images.device), {}

    fn.differentiable = True
    return fn
