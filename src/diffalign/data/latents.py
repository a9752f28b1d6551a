"""Images of feedback sets and data sets in the model's sample space.

- `encode(model, images)`: `model.encode_images` in batches, without gradients.
- `pairs(model, path)` / `labels(model, path)`: a feedback set (`diffalign.data.feedback`,
  loaded without decoding its images) and its samples, as the offline methods train on it.
  `labels` takes a pairs file too (the Pick-a-Pic rule: preferred at least once = desirable).
- `encode_files(model, files)`: images read from files, each once (a file named by several
  rows is encoded once), brought to the model's resolution (`fit`: shortest edge resized,
  centre crop; grey repeated to RGB) and encoded in batches. For latent models (a VAE in
  `model.parts`) the latents are cached on disk (`diffalign.cache`), keyed by the model
  folder, its VAE weights, the resolution and every file's path, size and modification
  time: a second run on the same set encodes nothing. Pixel models (digits, toy2d) encode
  by a formula, so nothing is cached; their files must all have one shape.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

BATCH = 16


@torch.no_grad()
def encode(model, images: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """images (N, C, H, W) in [0, 1] -> samples (N, *sample_shape) on the model's device."""
    if len(images) == 0:
        return torch.empty(0, *model.sample_shape, device=model.device)
    return torch.cat([model.encode_images(images[i:i + batch_size].to(model.device)).detach()
                      for i in range(0, len(images), batch_size)])


def resolution(model) -> int | None:
    """The square image size a latent model encodes (None: a pixel model, images as they are)."""
    return model.pipeline.resolution if model.pipeline and "vae" in model.parts else None


def fit(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """(C, H, W) -> (3, size, size): shortest edge resized to `size` (antialiased), centre crop; unchanged if None."""
    if size is None:
        return image
    x = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
        top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
        x = x[:, top:top + size, left:left + size]
    return x.clamp(0, 1)


def _key(model, files: list[Path], size) -> dict:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    vae = Path(model.path or "") / "vae"
    weights = sorted(vae.glob("*.safetensors")) if model.path else []
    return {"model": str(model.name), "vae": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights],
            "resolution": size, "files": h.hexdigest(), "n": len(files)}


def encode_files(model, files, batch_size: int = BATCH) -> torch.Tensor:
    """Samples (len(files), *sample_shape) on the model's device for image files (see the module docstring)."""
    from .feedback import FeedbackError, load_sample

    files = [Path(f) for f in files]
    unique = list(dict.fromkeys(files))
    index = {f: i for i, f in enumerate(unique)}
    size = resolution(model)

    def run(dest: Path | None = None) -> torch.Tensor:
        out, shapes = [], set()
        for i in range(0, len(unique), batch_size):
            imgs = [fit(load_sample(f), size) for f in unique[i:i + batch_size]]
            shapes |= {tuple(x.shape) for x in imgs}
            if len(shapes) > 1:
                raise FeedbackError(f"images have different shapes {sorted(shapes)}, and model {model.name!r} takes "
                                    "them as they are: give images of one shape")
            out.append(encode(model, torch.stack(imgs), batch_size).cpu())
        x = torch.cat(out)
        if dest is not None:
            from safetensors.torch import save_file

            save_file({"latents": x.contiguous()}, str(dest / "latents.safetensors"))
        return x

    if size is None:
        x = run()
    else:
        from safetensors.torch import load_file

        from ..cache import cached_dir

        folder = cached_dir("latents", _key(model, unique, size), run)
        x = load_file(str(folder / "latents.safetensors"))["latents"]
    return x[[index[f] for f in files]].to(model.device)


def pairs(model, path):
    """(PairSet, x_w, x_l): a pairs JSONL and its winners' and losers' samples."""
    from .feedback import load_pairs

    ps = load_pairs(path, images=False)
    x = encode_files(model, ps.winner_files + ps.loser_files)
    return ps, x[:len(ps)], x[len(ps):]


def labels(model, path):
    """(LabelSet, x): a labels JSONL (or a pairs JSONL, by the Pick-a-Pic rule) and its samples."""
    from .feedback import PairSet, labels_from_pair_set, load_feedback

    ls = load_feedback(path, images=False)
    ls = labels_from_pair_set(ls) if isinstance(ls, PairSet) else ls
    return ls, encode_files(model, ls.files)
