"""LoRA adapters through peft, and the frozen reference as "the base with adapters off".

Saved LoRA weights use the diffusers layout: `pytorch_lora_weights.safetensors` with
peft key names prefixed by the denoiser's pipeline component, `unet.` (what
`pipe.load_lora_weights(dir)` reads for UNet pipelines) or `transformer.` (SD3), plus
`adapter_config.json`. The file's safetensors metadata holds the adapter config under
`lora_adapter_metadata` (keys `unet.r`, `unet.lora_alpha`, ...),
as diffusers' own `save_lora_weights` writes it, so `load_lora_weights` applies the same
alpha / rank scale (diffusers >= 0.35 reads it; older versions assume alpha = rank).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_dir

LORA_FILE = "pytorch_lora_weights.safetensors"
PREFIX = "unet."
PREFIXES = (PREFIX, "transformer.")  # the denoiser components diffusers' LoRA loaders know
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / accelerate wrappers (saving a wrapped model prefixes keys)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def add_lora(denoiser: torch.nn.Module, targets: list[str], rank: int = 8, alpha: float = 8.0) -> LoraConfig:
    """Freeze the denoiser and inject trainable LoRA adapters into `targets`."""
    if not targets:
        raise ValueError("LoRA needs target module names (lora.targets, or the model's lora_targets)")
    names = {n.split(".")[-1] for n, _ in denoiser.named_modules()} | {n for n, _ in denoiser.named_modules()}
    missing = [t for t in targets if t not in names and not any(n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of the denoiser; check lora.targets")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    denoiser.requires_grad_(False)
    inject_adapter_in_model(config, denoiser)
    for n, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in n)
    return config


def has_lora(denoiser: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in unwrap(denoiser).modules())


@contextlib.contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """Within the block the denoiser computes the frozen base model (the reference).

    It sets peft's per-layer switch (`_disable_adapters`, what every LoRA forward reads) rather than
    calling `enable_adapters`, which also flips requires_grad: under FSDP the parameter objects a
    module holds change between its sharded and gathered forms during a forward, so flags flipped on
    one form and restored on the other would leave trained parameters frozen."""
    layers = [m for m in unwrap(denoiser).modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise RuntimeError("the denoiser has no LoRA adapters, so there is no adapter-free reference")
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, before):
            m._disable_adapters = flag


def config_dict(config: LoraConfig) -> dict:
    """The adapter config as JSON-ready values (sets become sorted lists)."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def write_lora(denoiser: torch.nn.Module, folder: str | Path, config: LoraConfig | None = None,
               prefix: str = PREFIX, state: dict | None = None) -> None:
    """Write the adapters (diffusers layout, alpha / rank in the metadata) into the existing `folder`;
    `prefix`: the denoiser's component in the pipeline ('unet.', or 'transformer.' for SD3);
    `state`: the denoiser's state dict to take them from (default: its own; a sharded run
    passes the whole tensors gathered from its shards)."""
    state = get_peft_model_state_dict(unwrap(denoiser), state_dict=state)
    metadata = {"format": "pt"}
    if config is not None:
        cfg = config_dict(config)
        metadata[METADATA_KEY] = json.dumps({prefix + k: v for k, v in cfg.items()}, indent=2, sort_keys=True,
                                            default=str)
        (Path(folder) / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    save_file({prefix + k: v.detach().contiguous().cpu() for k, v in state.items()}, str(Path(folder) / LORA_FILE),
              metadata=metadata)


def save_lora(denoiser: torch.nn.Module, folder: str | Path, config: LoraConfig | None = None) -> Path:
    """Write the adapters (diffusers layout) into `folder`, atomically."""
    with atomic_dir(folder) as tmp:
        write_lora(denoiser, tmp, config)
    return Path(folder)


def load_lora(denoiser: torch.nn.Module, folder: str | Path) -> None:
    """Load adapters saved by `save_lora` into a denoiser that already has them injected."""
    path = Path(folder) / LORA_FILE
    if not path.exists():
        raise FileNotFoundError(f"no LoRA weights at {path}: expected a folder written by diffalign (save_lora)")
    state = {_unprefixed(k): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(unwrap(denoiser), state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path} holds {len(unexpected)} keys this model does not have, e.g. {unexpected[:3]}")


def _unprefixed(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
