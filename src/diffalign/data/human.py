"""Human preference labels for an online run, one round per epoch (D3PO's human-feedback mode).

A run with `args.labels: DIR` never queries a reward for training. At epoch e it samples
its pairs (deterministically from the run seed, the epoch and the current weights), and
looks for DIR/epoch-<e>/labels.json:

- missing: it writes the round — DIR/epoch-<e>/pairs.json (one row per pair:
  {"prompt", "a", "b"} with image ids, plus "a_file"/"b_file" PNGs under img/, or the
  sample values for non-image models) and round.json ({"run": the run folder, "epoch",
  "pairs"}), and stops with `LabelsNeeded`. A person labels the pairs in the browser
  (`diffalign label DIR/epoch-<e>`, which writes labels.json once every pair is answered)
  or writes labels.json by hand, and resumes the run (`diffalign train --resume RUN`);
  the same pairs are sampled again and trained on.
- present: a JSON list of {"prompt": str, "a": id, "b": id, "choice": "a" | "b" | "tie"};
  every pair of the round must be labelled once. Ties give no training pair.

With several processes each writes pairs-<rank>.json; one labels.json covers them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .feedback import save_png

CHOICES = ("a", "b", "tie")
ROUND_FILE = "round.json"  # which run wrote the round (for the "resume with" command)
ANSWERS_FILE = "answers.json"  # the labelling page's progress; the trainer never reads it


class LabelsNeeded(RuntimeError):
    """The run stopped to wait for a human label file; resume it once the file is written."""


def round_dir(labels: str | Path, epoch: int) -> Path:
    return Path(labels) / f"epoch-{epoch:04d}"


def image_ids(epoch: int, batch: int, indices) -> list[tuple[str, str]]:
    return [(f"e{epoch:04d}-b{batch:02d}-i{i:04d}-a", f"e{epoch:04d}-b{batch:02d}-i{i:04d}-b") for i in indices]


def write_round(folder: Path, rows: list[dict], images_a: torch.Tensor, images_b: torch.Tensor,
                part: int | None = None) -> Path:
    """pairs.json (pairs-PART.json: one process's part of a round written by several) and the images of
    the pairs (rows: prompt, a, b)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for row, xa, xb in zip(rows, images_a.detach().float().cpu(), images_b.detach().float().cpu()):
        row = dict(row)
        for side, x in (("a", xa), ("b", xb)):
            if x.ndim == 3:  # an image (C, H, W) in [0, 1]
                rel = Path("img") / f"{row[side]}.png"
                save_png(x, folder / rel, scale=8)
                row[f"{side}_file"] = str(rel)
            else:
                row[f"{side}_value"] = [round(float(v), 6) for v in x.flatten()]
        out.append(row)
    path = folder / ("pairs.json" if part is None else f"pairs-{part}.json")
    path.write_text(json.dumps(out, indent=1))
    return path


def write_round_info(folder: Path, run: Path | None, epoch: int, pairs: int) -> None:
    info = {"run": None if run is None else str(Path(run).resolve()), "epoch": epoch, "pairs": pairs}
    Path(folder, ROUND_FILE).write_text(json.dumps(info, indent=1))


def answered(folder: Path) -> int:
    """How many pairs the labelling page has answered so far in this round (0 without its file)."""
    try:
        return len(json.loads(Path(folder, ANSWERS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return 0


def read_labels(path: Path, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_wins, keep) bool tensors over `rows` from a labels.json; every row needs one label."""
    try:
        labels = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a list of "
                         '{"prompt", "a", "b", "choice": "a" | "b" | "tie"}') from None
    if not isinstance(labels, list):
        raise ValueError(f"{path} must hold a JSON list of labels, got {type(labels).__name__}")
    by_pair = {}
    for n, lab in enumerate(labels):
        where = f"{path} entry {n}"
        if not isinstance(lab, dict) or not {"a", "b", "choice"} <= set(lab):
            raise ValueError(f"{where}: needs keys 'prompt', 'a', 'b', 'choice', got {lab!r}")
        if lab["choice"] not in CHOICES:
            raise ValueError(f"{where}: choice must be 'a', 'b' or 'tie', got {lab['choice']!r}")
        key = (lab["a"], lab["b"])
        if key in by_pair:
            raise ValueError(f"{where}: pair ({lab['a']}, {lab['b']}) is labelled twice")
        by_pair[key] = lab
    a_wins, keep = [], []
    for row in rows:
        lab = by_pair.get((row["a"], row["b"]))
        if lab is None:
            raise ValueError(f"{path} has no label for pair ({row['a']}, {row['b']}) (prompt {row['prompt']!r}): "
                             "label every pair listed in the round's pairs file "
                             f"(`diffalign label {Path(path).parent}` writes a complete file)")
        if "prompt" in lab and lab["prompt"] != row["prompt"]:
            raise ValueError(f"{path}: pair ({row['a']}, {row['b']}) was sampled for prompt {row['prompt']!r}, "
                             f"but its label says {lab['prompt']!r}")
        a_wins.append(lab["choice"] == "a")
        keep.append(lab["choice"] != "tie")
    return torch.tensor(a_wins), torch.tensor(keep)
