"""Atomic checkpoints and resume.

A checkpoint folder `checkpoints/epoch-000012/` holds everything needed to continue
after epoch 12 exactly as an uninterrupted run would:
- `modules/<name>.safetensors`: each trainable module's trainable parameters (and its
  buffers), by the name the method gave it (`denoiser` = the LoRA adapters, or all
  weights when fully fine-tuning);
- `optimizer.pt`: the optimizer state (read back with `torch.load(weights_only=True)`);
- `method.safetensors`: the tensors of the method's state, if any;
- `state.json`: next epoch, counters, the LR schedule's state, and the method's state
  (tensors replaced by references into method.safetensors).
A sharded run (`train.sharding: fsdp`) writes `shards/` instead of `modules/` and
`optimizer.pt`: `torch.distributed.checkpoint`'s files, each process its shards of the
modules and of the optimizer state; they load into any number of processes.
Folders are written under a temporary name and renamed into place, so a crash mid-write
leaves the previous checkpoint intact and no half-written one. Randomness needs no saved
state: every epoch reseeds from (run seed, epoch).
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
TENSOR = "__tensor__"


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
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in place of `final` (renames only)."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def trainable_keys(module: torch.nn.Module) -> set[str]:
    """Names of a module's trainable parameters and of its buffers: what checkpoints and final/ keep."""
    return {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers of a module (CPU, contiguous)."""
    out = {n: p for n, p in module.named_parameters() if p.requires_grad}
    out.update(dict(module.named_buffers()))
    return {n: t.detach().cpu().contiguous() for n, t in out.items()}


def split_tensors(obj, tensors: dict, path: str = "state"):
    """`obj` with every tensor replaced by a reference; the tensors go into `tensors`."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(obj, dict):
        return {k: split_tensors(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj, tensors: dict):
    """The inverse of `split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR}:
            return tensors[obj[TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save(folder: Path, modules: dict[str, torch.nn.Module], optimizer, state: dict, method_state: dict | None = None,
         keep: int = 2) -> Path:
    """Write checkpoint `folder/epoch-{state['epoch']:06d}` and keep the newest `keep`."""
    final = Path(folder) / f"epoch-{state['epoch']:06d}"
    with atomic_dir(final) as tmp:
        (tmp / "modules").mkdir()
        for name, module in modules.items():
            save_file(module_state(module), str(tmp / "modules" / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_state(tmp, state, method_state)
    prune(folder, keep)
    return final


def write_state(tmp: Path, state: dict, method_state: dict | None) -> None:
    """state.json, and method.safetensors for the method state's tensors."""
    tensors: dict = {}
    method_json = split_tensors(method_state or {}, tensors)
    if tensors:
        save_file(tensors, str(tmp / "method.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "method": method_json}, indent=1))


def prune(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ---- sharded checkpoints (train.sharding: fsdp) -------------------------------------------
SHARDS = "shards"


def sharded_state(container: torch.nn.Module, optimizer) -> dict:
    """The trained modules' state (trainable parameters and buffers) and the optimizer's, as
    `torch.distributed.checkpoint` saves and loads them: each process its own shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    keep = trainable_keys(container)
    modules = {k: v for k, v in get_model_state_dict(container).items() if k in keep}
    if optimizer is None:  # weights only (diffalign export, eval)
        return {"modules": modules}
    return {"modules": modules, "optimizer": get_optimizer_state_dict(container, optimizer)}


def save_sharded(folder: Path, modules: dict[str, torch.nn.Module], optimizer, state: dict, method_state: dict | None,
                 keep: int, dist) -> Path:
    """`save` for sharded runs; every process calls it. Each process writes its shards of the
    modules and of the optimizer state into `shards/`, the main process state.json; the folder
    is renamed into place by the main process only after every process has finished writing, so
    a crash leaves no half checkpoint."""
    import torch.distributed.checkpoint as dcp

    final = Path(folder) / f"epoch-{state['epoch']:06d}"
    tmp = final.parent / f".tmp-{final.name}"  # the same name on every process
    if dist.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    dcp.save(sharded_state(torch.nn.ModuleDict(modules), getattr(optimizer, "optimizer", optimizer)),
             checkpoint_id=str(tmp / SHARDS))
    dist.barrier()
    if dist.is_main:
        write_state(tmp, state, method_state)
        replace_dir(tmp, final)
        prune(folder, keep)
    dist.barrier()
    return final


def load_sharded(path: Path, container: torch.nn.Module, optimizer) -> None:
    """Restore modules and optimizer (None: modules only) from `path/shards` (any process count,
    sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = sharded_state(container, optimizer)
    dcp.load(state, checkpoint_id=str(path / SHARDS))
    set_model_state_dict(container, state["modules"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(container, optimizer, state["optimizer"])


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load(path: Path, modules: dict[str, torch.nn.Module], optimizer=None) -> tuple[dict, dict]:
    """Restore every module (and the optimizer, if given) from a checkpoint folder, plain or
    sharded (`shards/`, any process count); return (state, method_state)."""
    path = Path(path)
    if (path / "trainable.safetensors").exists():
        raise ValueError(f"checkpoint {path} was written by diffalign < 0.2 (trainable.safetensors): "
                         "this version cannot resume it; start the run again")
    sharded = (path / SHARDS).is_dir()
    needed = ["state.json"] + ([f"{SHARDS}/.metadata"] if sharded else
                               [f"modules/{n}.safetensors" for n in modules] + ["optimizer.pt"])
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to "
                                "resume from the previous one")
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "method.safetensors")) if (path / "method.safetensors").exists() else {}
        if sharded:
            load_sharded(path, torch.nn.ModuleDict(modules), getattr(optimizer, "optimizer", optimizer))
        else:
            saved = {n: load_file(str(path / "modules" / f"{n}.safetensors")) for n in modules}
            opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # corrupt file: say which checkpoint and what to do
        raise ValueError(f"checkpoint {path} is corrupt or was written by another config ({type(e).__name__}: {e}); "
                         "delete it to resume from the previous one") from e
    if not sharded:
        _copy_into(path, modules, saved)
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
    method_state = join_tensors(state.pop("method", {}), tensors)
    return state, method_state


def _copy_into(path: Path, modules: dict[str, torch.nn.Module], saved: dict) -> None:
    for name, module in modules.items():
        own = dict(module.named_parameters()) | dict(module.named_buffers())
        unknown = [k for k in saved[name] if k not in own or own[k].shape != saved[name][k].shape]
        if unknown:
            raise ValueError(f"checkpoint {path}: module '{name}' has tensors this run's lacks or shapes differently, "
                             f"e.g. {unknown[:3]}: was it written by another config?")
        with torch.no_grad():
            for k, t in saved[name].items():
                own[k].copy_(t.to(own[k].device))
