"""Offline feedback sets for Diffusion-DPO (pairs) and Diffusion-KTO (binary labels).

Files (image paths are relative to the JSONL file's folder; images are 8-bit PNG):

    pairs.jsonl   {"prompt": str, "winner": "img/..png", "loser": "img/..png", "tie": bool?}
                  ("chosen" / "rejected" are read as "winner" / "loser", the Pick-a-Pic naming)
    labels.jsonl  {"prompt": str, "image": "img/..png", "desirable": true|false}
                  ("label": true|false, or 1|0, is read as "desirable")

Building sets from a base model and a reward (what the bench's offline cells learn from):
`make_pairs` ranks two samples per pair by the reward; `make_labels` scores each sample alone and
labels it by its rank among its prompt's samples (above the median, or the top quarter: the
1 : 3 ratio of Pick-a-Pic's labels); `pairs_from_labels` turns labels into the pairs they can
form without reward values, `labels_from_pairs` pairs into labels (the Pick-a-Pic rule).

Loading validates every row first and raises one `FeedbackError` naming each bad
row by line number (bad JSON, missing key, missing file, bad label, unreadable
image), so a broken set fails before training, never mid-epoch. Ties are dropped
and counted.

Images are stored as the *decoded* image (what rewards see, [0, 1]) and mapped
back into the model's sample space by the model's `encode_images` (pixel models:
x = 2·img − 1; latent models: their VAE), once when a method starts
(`diffalign.data.latents.encode_files`: batched, and cached on disk for latent
models). With `images=False` a loader checks that every image can be opened (from
its header) without decoding it, and the set holds file paths only: what a latent
model's methods use, so a large set of real images never sits in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..seeding import generators, seed_for


class FeedbackError(ValueError):
    """A feedback set with bad rows; the message lists every bad row by line number."""


# ---- images --------------------------------------------------------------------
def save_png(img: torch.Tensor, path: Path, scale: int = 1) -> None:
    """Save one decoded image (C, H, W) in [0, 1] as an 8-bit PNG (grayscale for C == 1),
    enlarged `scale` times with nearest-neighbour pixels (for people to look at)."""
    from PIL import Image

    a = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(a)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def is_image(sample: torch.Tensor) -> bool:
    """Decoded samples of shape (C, H, W) are images (PNG files); anything else (toy2d's points)
    is stored exactly as a .npy array."""
    return sample.ndim == 3


def sample_suffix(sample: torch.Tensor) -> str:
    return ".png" if is_image(sample) else ".npy"


def save_sample(sample: torch.Tensor, path: Path) -> None:
    """A decoded sample as PNG (an image) or .npy (float32, anything else)."""
    if path.suffix == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, sample.detach().float().cpu().numpy(), allow_pickle=False)
    else:
        save_png(sample, path)


def load_sample(path: Path) -> torch.Tensor:
    """A sample as `save_sample` wrote it: a .npy array as saved, else an image (`load_png`)."""
    if Path(path).suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    return load_png(path)


def load_png(path: Path) -> torch.Tensor:
    """An 8-bit PNG as float (C, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        a = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(a.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


# ---- loading ---------------------------------------------------------------------
@dataclass
class PairSet:
    prompts: list[str]
    winners: torch.Tensor | None  # (N, C, H, W) decoded images in [0, 1]; None when loaded with images=False
    losers: torch.Tensor | None
    ties_dropped: int = 0
    path: Path | None = None
    winner_paths: list[str] = field(default_factory=list)
    loser_paths: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.prompts)

    @property
    def winner_files(self) -> list[Path]:
        return [self.path.parent / p for p in self.winner_paths]

    @property
    def loser_files(self) -> list[Path]:
        return [self.path.parent / p for p in self.loser_paths]


@dataclass
class LabelSet:
    prompts: list[str]
    images: torch.Tensor | None  # (N, C, H, W) in [0, 1]; None when loaded with images=False
    desirable: torch.Tensor  # (N,) bool
    path: Path | None = None
    files: list[Path] = field(default_factory=list)  # the image files, row by row

    def __len__(self):
        return len(self.prompts)

    @property
    def counts(self) -> dict:
        d = int(self.desirable.sum())
        return {"desirable": d, "undesirable": len(self) - d}


def _read_rows(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feedback file {str(path)!r} does not exist")
    rows, errors = [], []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            errors.append(f"line {i}: invalid JSON ({e})")
            continue
        rows.append((i, row))
    return path, rows, errors


def _image(base: Path, rel, key: str, lineno: int, errors: list, shapes: set, load: bool = True):
    if not isinstance(rel, str) or not rel:
        errors.append(f"line {lineno}: '{key}' must be an image path")
        return None
    p = base / rel
    if not p.is_file():
        errors.append(f"line {lineno}: '{key}' file {rel!r} not found")
        return None
    try:
        img = load_sample(p) if load else _check_readable(p)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad row
        errors.append(f"line {lineno}: '{key}' file {rel!r} is not a readable image ({type(e).__name__})")
        return None
    if load:
        shapes.add(tuple(img.shape))
    return img if load else p


def _check_readable(path: Path) -> Path:
    """Open an image's header (or a .npy array's) without decoding the pixels."""
    if path.suffix == ".npy":
        np.load(path, mmap_mode="r", allow_pickle=False)
        return path
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    return path


def _raise(path: Path, errors: list[str], n_rows: int) -> None:
    if errors:
        shown = errors[:50] + ([f"... and {len(errors) - 50} more"] if len(errors) > 50 else [])
        raise FeedbackError(f"{path}: {len(errors)} bad row(s):\n  " + "\n  ".join(shown))
    if n_rows == 0:
        raise FeedbackError(f"{path}: no usable rows")


def _has_keys(row: dict, keys: tuple[str, ...], i: int, errors: list) -> bool:
    """Row i has every key and a string prompt; otherwise record why and return False."""
    missing = [k for k in keys if k not in row]
    if missing:
        errors.append(f"line {i}: missing key(s) {', '.join(missing)}")
        return False
    if not isinstance(row["prompt"], str):
        errors.append(f"line {i}: 'prompt' must be a string")
        return False
    return True


def load_pairs(path, images: bool = True) -> PairSet:
    """Load and validate a pairs JSONL; ties are dropped (counted in `ties_dropped`)."""
    path, rows, errors = _read_rows(path)
    base, shapes = path.parent, set()
    prompts, W, L, wp, lp, ties = [], [], [], [], [], 0
    for i, row in rows:
        keys = ("chosen", "rejected") if "winner" not in row and "loser" not in row and (
            "chosen" in row or "rejected" in row) else ("winner", "loser")
        if not _has_keys(row, ("prompt", *keys), i, errors):
            if "missing key" in errors[-1]:
                errors[-1] += " (a pair is {prompt, winner, loser} or {prompt, chosen, rejected})"
            continue
        tie = row.get("tie", False)
        if not isinstance(tie, bool):
            errors.append(f"line {i}: 'tie' must be true or false, got {tie!r}")
            continue
        n_err = len(errors)
        w = _image(base, row[keys[0]], keys[0], i, errors, shapes, images)
        lo = _image(base, row[keys[1]], keys[1], i, errors, shapes, images)
        if len(errors) > n_err:
            continue
        if tie:
            ties += 1
            continue
        prompts.append(row["prompt"]), W.append(w), L.append(lo), wp.append(row[keys[0]]), lp.append(row[keys[1]])
    if len(shapes) > 1:
        errors.append(f"images have different shapes: {sorted(shapes)}")
    _raise(path, errors, len(prompts))
    if not images:
        return PairSet(prompts, None, None, ties, path, wp, lp)
    return PairSet(prompts, torch.stack(W), torch.stack(L), ties, path, wp, lp)


def load_labels(path, images: bool = True) -> LabelSet:
    """Load and validate a labels JSONL."""
    path, rows, errors = _read_rows(path)
    base, shapes = path.parent, set()
    prompts, imgs, labels, files = [], [], [], []
    for i, row in rows:
        if "desirable" not in row and "label" in row:
            row = {**row, "desirable": row["label"] if isinstance(row["label"], bool) else
                   {1: True, 0: False}.get(row["label"], row["label"])}
        if not _has_keys(row, ("prompt", "image", "desirable"), i, errors):
            continue
        if not isinstance(row["desirable"], bool):
            errors.append(f"line {i}: 'desirable' must be true or false, got {row['desirable']!r}")
            continue
        img = _image(base, row["image"], "image", i, errors, shapes, images)
        if img is None:
            continue
        prompts.append(row["prompt"]), imgs.append(img), labels.append(row["desirable"])
        files.append(base / row["image"])
    if len(shapes) > 1:
        errors.append(f"images have different shapes: {sorted(shapes)}")
    _raise(path, errors, len(prompts))
    return LabelSet(prompts, torch.stack(imgs) if images else None, torch.tensor(labels, dtype=torch.bool), path,
                    files)


def load_feedback(path, images: bool = True):
    """A pairs or labels set, told apart by the first row's keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feedback file {str(path)!r} does not exist")
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                first = json.loads(line)
            except ValueError:
                break
            if isinstance(first, dict) and "image" in first:
                return load_labels(path, images)
            break
    return load_pairs(path, images)


# ---- building sets from a base model and a reward ----------------------------------
@torch.no_grad()
def make_pairs(model, reward, prompts, n_pairs: int, out_dir, seed: int = 0, bt_noise: float | None = None,
               sampler=None, batch_size: int = 128) -> dict:
    """Sample two images per pair from `model` with `sampler` (default: the model's own number
    of steps, eta 1, no guidance), rank them with `reward`, write out_dir/pairs.jsonl.

    Pair i uses prompt prompts[i % len(prompts)] and noise seeded by (seed, i, a|b).
    Without `bt_noise` the higher reward wins (exact ties are marked `tie`); with it the
    winner is drawn by Bradley–Terry: P(a wins) = σ((r_a − r_b) / bt_noise).
    Returns stats (counts, mean reward of winners/losers, label agreement with the reward).
    """
    from ..sampler import Sampler

    sampler = sampler or Sampler(num_steps=model.num_inference_steps, guidance_scale=1.0)
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    if bt_noise is not None and bt_noise <= 0:
        raise ValueError("bt_noise (Bradley–Terry temperature) must be > 0")
    prompts = list(prompts)
    rng = torch.Generator().manual_seed(seed_for(seed, "bt"))
    rows, won = [], []  # won: (winner's reward, loser's reward) of every pair that is not a tie
    for start in range(0, n_pairs, batch_size // 2 or 1):
        idx = list(range(start, min(n_pairs, start + max(1, batch_size // 2))))
        ps = [prompts[i % len(prompts)] for i in idx]
        qa, qb = _sample_pairs(model, sampler, ps, idx, seed)
        ra, _ = reward(qa.to(model.device), ps)
        rb, _ = reward(qb.to(model.device), ps)
        ra, rb = ra.float().cpu(), rb.float().cpu()
        for j, i in enumerate(idx):
            row, rewards = _write_pair(out, i, ps[j], (qa[j], qb[j]), (ra[j], rb[j]), bt_noise, rng)
            rows.append(row)
            if rewards is not None:
                won.append(rewards)
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = len(won)
    stats = {"path": str(path), "pairs": len(rows), "ties": len(rows) - n,
             "winner_reward_mean": sum(w for w, _ in won) / max(1, n),
             "loser_reward_mean": sum(lo for _, lo in won) / max(1, n),
             "agreement_with_reward": sum(int(w >= lo) for w, lo in won) / max(1, n), "bt_noise": bt_noise}
    (out / "pairs_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def _sample_pairs(model, sampler, ps: list[str], idx: list[int], seed: int):
    """Both samples of the pairs `idx` (prompts `ps`), images quantised to 8 bits as they will be
    loaded back (other samples are stored exactly): (a samples, b samples)."""
    imgs = []
    for side in ("a", "b"):
        gens = [generators(model.device, "pairs", seed, side, indices=[i])[0] for i in idx]
        traj = sampler.sample(model, ps, generator=gens, with_logprob=False)
        imgs.append(model.decode(traj.final).cpu())
    qa, qb = [(x.clamp(0, 1) * 255).round() / 255 if is_image(x[0]) else x for x in imgs]
    return qa, qb


def _write_pair(out: Path, i: int, prompt: str, samples, rewards, bt_noise: float | None, rng):
    """Save pair i's two samples and pick its winner: the higher reward (an exact tie is marked),
    or with `bt_noise` a Bradley–Terry draw from `rng`. Returns its pairs.jsonl row and, unless
    tied, (winner's reward, loser's reward)."""
    (xa, xb), (ra, rb) = samples, rewards
    ext = sample_suffix(xa)
    fa, fb = f"img/{i:06d}_a{ext}", f"img/{i:06d}_b{ext}"
    save_sample(xa, out / fa)
    save_sample(xb, out / fb)
    d = float(ra - rb)
    if bt_noise is None:
        a_wins, tie = d > 0, d == 0
    else:
        p = 1.0 / (1.0 + math.exp(-d / bt_noise)) if abs(d / bt_noise) < 700 else float(d > 0)
        a_wins, tie = bool(torch.rand((), generator=rng) < p), False
    w, lo = (fa, fb) if a_wins else (fb, fa)
    row = {"prompt": prompt, "winner": w, "loser": lo}
    if tie:
        return {**row, "tie": True}, None
    return row, (float(ra if a_wins else rb), float(rb if a_wins else ra))


@torch.no_grad()
def make_labels(model, reward, prompts, n: int, out_dir, seed: int = 0, desirable_fraction: float = 0.5,
                sampler=None, batch_size: int = 128) -> dict:
    """Sample `n` images from `model`, score each with `reward` and label it alone (`rank_labels`:
    within its prompt, the top `desirable_fraction` of the rewards are desirable; 0.5 = above the
    median), write out_dir/labels.jsonl. `n` reward queries, one per image.

    The images are `make_pairs`'s at the same seed and sampler (images 2i and 2i + 1 are pair i's
    a and b samples, with prompt prompts[i % len(prompts)], under the same file names), so a
    labelled set and a pair set built from one seed differ only in their feedback.
    Returns stats (counts, mean reward of desirable and undesirable images).
    """
    from ..sampler import Sampler

    if not 0 < desirable_fraction < 1:
        raise ValueError(f"desirable_fraction must lie in (0, 1), got {desirable_fraction}")
    if n < 1:
        raise ValueError(f"n (images to label) must be at least 1, got {n}")
    sampler = sampler or Sampler(num_steps=model.num_inference_steps, guidance_scale=1.0)
    out, prompts = Path(out_dir), list(prompts)
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows, rewards, step = [], [], max(1, batch_size // 2)
    for start in range(0, (n + 1) // 2, step):
        idx = list(range(start, min((n + 1) // 2, start + step)))
        ps = [prompts[i % len(prompts)] for i in idx]
        qa, qb = _sample_pairs(model, sampler, ps, idx, seed)
        kept = [(i, side, ps[j], x) for j, i in enumerate(idx) for side, x in (("a", qa[j]), ("b", qb[j]))
                if 2 * i + (side == "b") < n]  # an odd n leaves the last pair's b sample out
        r, _ = reward(torch.stack([x for *_, x in kept]).to(model.device), [prompt for _, _, prompt, _ in kept])
        for (i, side, prompt, x), ri in zip(kept, r.float().cpu().tolist()):
            rel = f"img/{i:06d}_{side}{sample_suffix(x)}"
            save_sample(x, out / rel)
            rows.append({"prompt": prompt, "image": rel})
            rewards.append(ri)
    labels = rank_labels(rewards, [row["prompt"] for row in rows], desirable_fraction)
    for row, d in zip(rows, labels):
        row["desirable"] = d
    path = out / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    d = sum(labels)
    stats = {"path": str(path), "images": len(rows), "desirable": d, "undesirable": len(rows) - d,
             "desirable_fraction": desirable_fraction,
             "desirable_reward_mean": mean([r for r, x in zip(rewards, labels) if x]),
             "undesirable_reward_mean": mean([r for r, x in zip(rewards, labels) if not x])}
    (out / "labels_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def rank_labels(rewards: list[float], prompts: list[str], desirable_fraction: float) -> list[bool]:
    """Binary labels from rewards, prompt by prompt: of a prompt's m samples the ⌊fraction · m⌋
    highest rewards are desirable, the rest undesirable (fraction 0.5: above the median, an odd
    prompt's middle sample included in the undesirable half; 0.25: the top quarter). Equal rewards
    rank in list order (earlier first), so the counts are exact and the labels deterministic when
    rewards tie, as a saturated reward's do."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    desirable = [False] * len(rewards)
    for members in groups.values():
        k = math.floor(len(members) * desirable_fraction + 1e-9)
        for i in sorted(members, key=lambda i: -rewards[i])[:k]:  # a stable sort: ties keep list order
            desirable[i] = True
    return desirable


def pairs_from_labels(labels, out_dir=None) -> tuple[list[dict], dict]:
    """The pairs binary labels can form without reward values: within each prompt, the i-th
    desirable image (in file order) wins against the i-th undesirable one, and the images left
    over on the larger side are dropped (a balanced set gives n / 2 pairs, a 1 : 3 set n / 4).

    `labels` is a labels JSONL path (or a LabelSet loaded from one). With `out_dir`, writes
    out_dir/pairs.jsonl, image paths relative to out_dir (the same image files, not copies).
    Returns (rows, counts) with counts = {pairs, unmatched_desirable, unmatched_undesirable}.
    """
    ls = labels if isinstance(labels, LabelSet) else load_labels(labels, images=False)
    sides: dict[str, tuple[list[Path], list[Path]]] = {}
    for prompt, file, d in zip(ls.prompts, ls.files, ls.desirable.tolist()):
        sides.setdefault(prompt, ([], []))[0 if d else 1].append(file)
    base = Path(out_dir) if out_dir is not None else ls.path.parent
    rel = lambda f: os.path.relpath(Path(f).resolve(), base.resolve())  # noqa: E731
    rows = [{"prompt": prompt, "winner": rel(w), "loser": rel(lo)}
            for prompt, (good, bad) in sides.items() for w, lo in zip(good, bad)]
    if not rows:
        raise FeedbackError(f"{ls.path}: no prompt has both a desirable and an undesirable image, so no pairs "
                            "can be formed")
    if out_dir is not None:
        base.mkdir(parents=True, exist_ok=True)
        (base / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = int(ls.desirable.sum())
    return rows, {"pairs": len(rows), "unmatched_desirable": d - len(rows),
                  "unmatched_undesirable": len(ls) - d - len(rows)}


@torch.no_grad()
def make_unlabelled(model, prompts, n: int, per_prompt: int, out_dir, kind: str, seed: int = 0, sampler=None,
                    batch_size: int = 128) -> Path:
    """Sample `per_prompt` images for each of `n` prompts (prompt i = prompts[i % len(prompts)], noise
    seeded by (seed, i, j)) for people to label with `diffalign label`: kind "images" writes
    out_dir/images.jsonl ({"prompt", "image"} per image, a KTO set), "candidates" writes
    out_dir/candidates.jsonl ({"prompt", "images"} per prompt, DPO candidates). Returns the file."""
    from ..sampler import Sampler

    if kind not in ("images", "candidates"):
        raise ValueError(f"kind must be 'images' or 'candidates', got {kind!r}")
    if per_prompt < (2 if kind == "candidates" else 1):
        raise ValueError(f"--per-prompt must be at least {2 if kind == 'candidates' else 1} for {kind}")
    sampler = sampler or Sampler(num_steps=model.num_inference_steps, guidance_scale=1.0)
    out, prompts = Path(out_dir), list(prompts)
    jobs = [(i, j) for i in range(n) for j in range(per_prompt)]
    files: dict[int, list[str]] = {}
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        gens = [generators(model.device, "unlabelled", seed, i, indices=[j])[0] for i, j in batch]
        traj = sampler.sample(model, [prompts[i % len(prompts)] for i, _ in batch], generator=gens, with_logprob=False)
        images = model.decode(traj.final).cpu()
        if not is_image(images[0]):
            raise ValueError(f"{kind} sets are images for people to look at; this model's samples are "
                             f"{tuple(images.shape[1:])} points, not images (use an image model, e.g. digits)")
        for (i, j), img in zip(batch, images):
            rel = f"img/{i:06d}_{j:02d}.png"
            save_png(img, out / rel)
            files.setdefault(i, []).append(rel)
    if kind == "candidates":
        rows = [{"prompt": prompts[i % len(prompts)], "images": f} for i, f in files.items()]
    else:
        rows = [{"prompt": prompts[i % len(prompts)], "image": rel} for i, f in files.items() for rel in f]
    path = out / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pick_a_pic(ps: PairSet) -> tuple[dict[str, tuple[str, int, bool]], set[str]]:
    """The Pick-a-Pic rule's inputs: every image path in first-seen order -> (prompt, row, winner side),
    and the paths preferred at least once (desirable)."""
    first: dict[str, tuple[str, int, bool]] = {}
    wins: set[str] = set()
    for i, (wp, lp) in enumerate(zip(ps.winner_paths, ps.loser_paths)):
        first.setdefault(wp, (ps.prompts[i], i, True))
        first.setdefault(lp, (ps.prompts[i], i, False))
        wins.add(wp)
    return first, wins


def labels_from_pair_set(ps: PairSet) -> LabelSet:
    """In memory: the Pick-a-Pic rule (preferred at least once = desirable) on a loaded PairSet
    (images or file paths only, as it was loaded)."""
    first, wins = _pick_a_pic(ps)
    keys = list(first)
    images = None
    if ps.winners is not None:
        images = torch.stack([(ps.winners if first[k][2] else ps.losers)[first[k][1]] for k in keys])
    return LabelSet([first[k][0] for k in keys], images, torch.tensor([k in wins for k in keys], dtype=torch.bool),
                    ps.path, [ps.path.parent / k for k in keys] if ps.path is not None else [])


def labels_from_pairs(pairs, out_dir=None) -> tuple[list[dict], dict]:
    """Binary labels from pairs by the Pick-a-Pic rule: an image preferred at least once
    is desirable, every other image undesirable. Images are identified by their path.

    `pairs` is a pairs JSONL path (or a PairSet loaded from one). With `out_dir`, writes
    out_dir/labels.jsonl with image paths rewritten relative to out_dir. Returns
    (rows, counts) with counts = {desirable, undesirable, ties_dropped}.
    """
    ps = pairs if isinstance(pairs, PairSet) else load_pairs(pairs)
    src = ps.path.parent.resolve() if ps.path is not None else None
    first, wins = _pick_a_pic(ps)
    rows = [{"prompt": prompt, "image": img, "desirable": img in wins} for img, (prompt, _, _) in first.items()]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r["image"] = os.path.relpath(src / r["image"], out.resolve()) if src else r["image"]
        (out / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = sum(r["desirable"] for r in rows)
    return rows, {"desirable": d, "undesirable": len(rows) - d, "ties_dropped": ps.ties_dropped}
