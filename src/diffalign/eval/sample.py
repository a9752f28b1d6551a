"""`diffalign sample RUN --out PATH`: draw from a run's aligned model (or its base).

The aligned model is the run's newest weights sampled by its method's sampler, exactly
as `diffalign eval` measures it. Sample i of prompt p draws its noise from a generator
seeded by (seed, i), so `--base` and the aligned model share noise at the same seed.

Output: for images a PNG grid (one row per prompt, `diffusers.utils.make_image_grid`,
pixels enlarged without smoothing), for 2-D points a `.npy` array; beside it
`<stem>.safetensors` with the raw tensors (`samples`: decoded, `latents`: the final
samples in model space) and the prompts in its metadata. Every check runs before
anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .core import sample_eval
from .run import load_run


def _pil(img: torch.Tensor, min_side: int = 64):
    """One decoded image (C, H, W) in [0, 1] as PIL, enlarged by a whole factor with nearest pixels."""
    from PIL import Image

    a = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    k = max(1, -(-min_side // min(im.size)))
    return im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im


def _out_path(out: Path, points: bool) -> Path:
    want = ".npy" if points else ".png"
    if out.suffix == "":
        return out.with_suffix(want)
    if out.suffix.lower() != want:
        kind = "2-D points" if points else "images"
        raise ValueError(f"--out {out}: this model samples {kind}, written as {want}; give a {want} path")
    return out


def sample_run(run_dir: str | Path, out: str | Path, n: int | None = None, prompts: list[str] | None = None,
               seed: int = 0, base: bool = False) -> dict:
    """Sample a finished run's aligned model (or, with `base`, the base model) and write `out`;
    `n` samples in all (rounded up to a whole number per prompt), default the run's eval.per_prompt
    per prompt. Returns what was written."""
    loaded = load_run(run_dir, finished=True)
    r = loaded.run
    prompts = list(prompts) if prompts else list(r.prompts)
    for p in prompts:
        r.model.encode_prompts([p])  # an unknown prompt fails now, with the model's message
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    per_prompt = -(-n // len(prompts)) if n else r.cfg.eval.per_prompt
    with r.reference() if base else contextlib.nullcontext():
        images, finals, all_prompts = sample_eval(r.model, r.sampler if base else loaded.sampler, prompts, per_prompt,
                                                  seed, purpose="sample")
    points = images.ndim == 2
    path = _out_path(Path(out), points)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    if points:
        with open(tmp, "wb") as f:
            np.save(f, images.detach().float().cpu().numpy())
    else:
        from diffusers.utils import make_image_grid

        make_image_grid([_pil(x) for x in images], rows=len(prompts), cols=per_prompt).save(tmp, format="PNG")
    meta = {"run": str(loaded.folder), "checkpoint": loaded.checkpoint.name, "model": "base" if base else "aligned",
            "method": loaded.cfg.method, "seed": str(seed), "prompts": json.dumps(all_prompts)}
    tensors = path.with_suffix(".safetensors")
    tmp_t = tensors.with_name(f".tmp-{os.getpid()}-{tensors.name}")
    save_file({"samples": images.detach().float().cpu().contiguous(),
               "latents": finals.detach().float().cpu().contiguous()}, str(tmp_t), metadata=meta)
    os.replace(tmp, path)
    os.replace(tmp_t, tensors)
    return {"path": str(path), "tensors": str(tensors), "n": len(all_prompts), "per_prompt": per_prompt,
            "prompts": prompts, "model": meta["model"], "checkpoint": loaded.checkpoint.name}

