"""Training image sets named in a config by one string (the `constrained` method's data).

- `digits[:key=value...]`: scikit-learn's digits (`diffalign.data.digits`), labelled by
  digit. Keys, applied in this order:
  - `split=train|test|all` (default train);
  - `minority=4,5,7` with `fraction=0.25`: those classes keep the first round(fraction·n)
    of their n images, every other class keeps all (an imbalanced main set);
  - `classes=4,5,7`: only those classes;
  - `count=20`: the first 20 images left.
  The order is the split's fixed permutation, so `digits:minority=4,5,7:fraction=0.25:classes=4`
  is exactly the class-4 images of `digits:minority=4,5,7:fraction=0.25`.
- `toy2d[:count=N][:seed=S]`: N points (default 4096) of the toy2d Gaussian mixture
  (`diffalign.models.toy2d`), unlabelled; the "images" are the points (N, 2);
- a folder of PNG images: flat (unlabelled), or one subfolder per label (its name is the
  label, e.g. `3/` for the digits model, a prompt for a text-to-image model);
- an `.npz` file: `images` (N, H, W), (N, C, H, W) or (N, H, W, C), floats in [0, 1] or
  uint8 in [0, 255], and optionally `labels` (N,) (ints or strings).

A label is a prompt: the model encodes it (`encode_prompts`), so a label the model does
not know is an error that names it. Images are decoded-space [0, 1] tensors; the method
maps them to the model's sample space with `model.encode_images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DatasetError(ValueError):
    """A data set spec that cannot be loaded; the message names it and the fix."""


@dataclass
class ImageSet:
    spec: str
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: list[str] | None  # one prompt per image, or None (unlabelled)

    def __len__(self) -> int:
        return len(self.images)


BUILTIN = ("digits", "toy2d")  # data sets with the name of the embedded model they train


def load(spec: str) -> ImageSet:
    """The image set named by `spec` (see the module docstring); never empty."""
    spec = str(spec).strip()
    if not spec:
        raise DatasetError("empty data set spec: name 'digits[:key=value...]', a PNG folder or an .npz file")
    if spec == "digits" or spec.startswith("digits:"):
        out = _digits(spec)
    elif spec == "toy2d" or spec.startswith("toy2d:"):
        out = _toy2d(spec)
    elif spec.endswith(".npz"):
        out = _npz(spec)
    else:
        out = _folder(spec)
    if len(out) == 0:
        raise DatasetError(f"data set {spec!r} is empty: it selects no images")
    return out


def _options(spec: str, keys: set[str]) -> dict[str, str]:
    opts = {}
    for part in spec.split(":")[1:]:
        key, eq, value = part.partition("=")
        if not eq or key not in keys:
            raise DatasetError(f"data set {spec!r}: {part!r} is not key=value with a key among {', '.join(sorted(keys))}")
        opts[key] = value
    return opts


def _toy2d(spec: str) -> ImageSet:
    from ..models import toy2d

    opts = _options(spec, {"count", "seed"})
    n, seed = int(_number(spec, "count", opts.get("count", "4096"))), int(_number(spec, "seed", opts.get("seed", "0")))
    if n < 1:
        raise DatasetError(f"data set {spec!r}: count must be >= 1")
    return ImageSet(spec, toy2d.sample_data(n, torch.Generator().manual_seed(seed)), None)


def _digits(spec: str) -> ImageSet:
    from . import digits

    opts = _options(spec, {"split", "minority", "fraction", "classes", "count"})
    try:
        x, y = digits.load(opts.get("split", "train"))
    except ValueError as e:
        raise DatasetError(f"data set {spec!r}: {e}") from None
    keep = torch.ones(len(y), dtype=torch.bool)
    if "minority" in opts:
        fraction = _number(spec, "fraction", opts.get("fraction", ""))
        if not 0 < fraction <= 1:
            raise DatasetError(f"data set {spec!r}: fraction must be in (0, 1], got {fraction}")
        for c in _classes(spec, opts["minority"]):
            rows = (y == c).nonzero().flatten()
            keep[rows[round(fraction * len(rows)):]] = False
    elif "fraction" in opts:
        raise DatasetError(f"data set {spec!r}: fraction needs minority=CLASSES (the classes it applies to)")
    if "classes" in opts:
        keep &= torch.isin(y, torch.tensor(_classes(spec, opts["classes"])))
    x, y = x[keep], y[keep]
    if "count" in opts:
        n = int(_number(spec, "count", opts["count"]))
        if n < 1:
            raise DatasetError(f"data set {spec!r}: count must be >= 1")
        x, y = x[:n], y[:n]
    return ImageSet(spec, x, [str(int(v)) for v in y])


def _classes(spec: str, text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        classes = []
    if not classes or any(not 0 <= c <= 9 for c in classes):
        raise DatasetError(f"data set {spec!r}: classes must be digits 0-9 separated by commas, got {text!r}")
    return classes


def _number(spec: str, key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"data set {spec!r}: {key} must be a number, got {text!r}") from None


def _npz(spec: str) -> ImageSet:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DatasetError(f"data set file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f:
            raise DatasetError(f"{str(path)!r} holds {', '.join(f.files) or 'nothing'}; it needs an 'images' array "
                               "(N, H, W) or (N, C, H, W) and optionally 'labels' (N,)")
        images = f["images"]
        labels = f["labels"] if "labels" in f else None
    x = torch.from_numpy(images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4:
        raise DatasetError(f"{str(path)!r}: 'images' has shape {tuple(images.shape)}; expected (N, H, W) or (N, C, H, W)")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise DatasetError(f"{str(path)!r}: float images must lie in [0, 1] (uint8 in [0, 255]); "
                           f"got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    if labels is not None and len(labels) != len(x):
        raise DatasetError(f"{str(path)!r}: {len(labels)} labels for {len(x)} images")
    return ImageSet(spec, x.contiguous(), None if labels is None else [str(v) for v in labels.tolist()])


def _folder(spec: str) -> ImageSet:
    from .feedback import load_png

    root = Path(spec).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data set folder {str(root)!r} does not exist (a spec is 'digits[:key=value...]', a "
                           "folder of PNG images or an .npz file)")
    flat = sorted(root.glob("*.png"))
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.png")))
    if flat and subdirs:
        raise DatasetError(f"data set folder {str(root)!r} mixes PNGs with labelled subfolders: use one layout")
    files = [(p, None) for p in flat] or [(p, d.name) for d in subdirs for p in sorted(d.glob("*.png"))]
    if not files:
        raise DatasetError(f"data set folder {str(root)!r} holds no PNG images (put them in it, or in one "
                           "subfolder per label)")
    images = [load_png(p) for p, _ in files]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DatasetError(f"data set folder {str(root)!r} mixes image shapes {sorted(shapes)}: resize them to one")
    labels = None if subdirs == [] else [label for _, label in files]
    return ImageSet(spec, torch.stack(images), labels)
