"""Atomic checkpoints and resume.

A checkpoint folder `checkpoints/epoch-000012/` holds everything needed to continue
after epoch 12 exactly as an uninterrupted run would:
- `trainable.safetensors`: the trainable parameters (LoRA adapters, or all weights);
- `optimizer.pt`: the optimizer state (read back with `torch.load(weights_only=True)`);
- `state.json`: next epoch, counters, and the method's own state (e.g. DDPO's
  per-prompt reward buffers).
Folders are written under a temporary name and renamed into place, so a crash
mid-write leaves the previous checkpoint intact and no half-written one.
Randomness needs no saved state: every epoch reseeds from (run seed, epoch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^epoch-(\d+)$")


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save(folder: Path, module: torch.nn.Module, optimizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `folder/epoch-{state['epoch']:06d}` and keep the newest `keep`."""
    final = Path(folder) / f"epoch-{state['epoch']:06d}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load(path: Path, module: torch.nn.Module, optimizer) -> dict:
    """Restore parameters and optimizer from a checkpoint folder; return its state.json."""
    path = Path(path)
    needed = ["trainable.safetensors", "optimizer.pt", "state.json"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to resume from the previous one")
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        state = json.loads((path / "state.json").read_text())
    except Exception as e:  # corrupt file: say which checkpoint and what to do
        raise ValueError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); delete it to resume from the previous one") from e
    params = dict(module.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ValueError(f"checkpoint {path} has parameters this model lacks, e.g. {unknown[:3]}: was it written by another config?")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device))
    if optimizer is not None:  # None: weights only (evaluation)
        optimizer.load_state_dict(opt_state)
    return state
