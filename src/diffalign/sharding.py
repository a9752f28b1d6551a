"""Sharded training with PyTorch FSDP2 (`train.sharding: fsdp`).

`fully_shard` is applied to each block of a trained network (a UNet's down, mid and up
blocks; a transformer's blocks) and then to the whole network, so every process keeps
1/P of its parameters, gradients and AdamW state, and gathers one block's weights at a
time for a forward or backward. Which parts are sharded:

- every trained network (the denoiser, full or with LoRA, and a method's second network:
  ∇-GFlowNet's flow, DPOK's value network, DDO's potential). A network with a 0-d
  parameter, which `fully_shard` refuses, stays whole on every process;
- the frozen copy of the base that full fine-tuning keeps as the reference: as large as the
  denoiser, so sharded too (with LoRA the reference is the same network, adapters off);
- not the VAE, text encoders or reward models: frozen, used under no_grad, and small beside
  a denoiser of the sizes that need sharding; every process keeps them whole.

Because a sharded network's forward is a collective, every process must run the same forwards
in the same order: a process holding nothing of a minibatch computes a padding row whose loss
counts zero (`processes.Share.pad`), and evaluation runs on every process (the same samples;
the main process writes). Gradients are averaged by FSDP's reduce-scatter, not by the loop.

Checkpoints: `torch.distributed.checkpoint` (each process writes its shards; see
`checkpoint.save_sharded`). `final/` holds full weights gathered on the main process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
SINGLE_BLOCKS = ("mid_block",)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks `fully_shard` wraps one by one: diffusers' UNet down/mid/up blocks and
    transformer blocks (SD3, FLUX); none for a network without them (then only the root)."""
    found = []
    for name in BLOCK_LISTS:
        part = getattr(module, name, None)
        if isinstance(part, nn.ModuleList):
            found.extend(part)
    for name in SINGLE_BLOCKS:
        part = getattr(module, name, None)
        if isinstance(part, nn.Module):
            found.append(part)
    return found


def shardable(module: nn.Module) -> bool:
    """`fully_shard` splits every parameter along dim 0, so it refuses 0-d parameters."""
    return all(p.ndim > 0 for p in module.parameters())


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@dataclass
class Policy:
    """How to shard: the process mesh, mixed precision and CPU offload."""

    mixed_precision: str = "no"  # 'bf16' / 'fp16': parameters gathered in that dtype, gradients reduced in fp32
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live on the CPU between uses

    def kwargs(self) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        out = {}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        if dtype is not None:
            out["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if self.cpu_offload:
            out["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs a GPU
        return out


def shard(module: nn.Module, policy: Policy) -> bool:
    """Apply `fully_shard` per block and at the root; False (module untouched) when it cannot be sharded."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(module):
        return True
    if not shardable(module):
        return False
    kwargs = policy.kwargs()
    for block in blocks(module):
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return True


def plain_class(module: nn.Module) -> type:
    """The network's own class under the FSDP subclass `fully_shard` swaps in."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable parameters and buffers (`checkpoint.trainable_keys`) as whole CPU
    tensors, gathered on the main process (a collective: every process calls it; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .checkpoint import trainable_keys

    keep = trainable_keys(module)
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in state.items() if k in keep}


def plain_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU instance of a diffusers network holding `state` (main process, for
    writing `final/` with the network's own `save_pretrained`)."""
    cls = plain_class(module)
    with torch.device("meta"):
        plain = cls.from_config(module.config)
    plain.load_state_dict(state, assign=True)
    return plain


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every process calls it), a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def reshard(module: nn.Module) -> None:
    """Every FSDP module inside back to its shards (the root stays gathered after a forward); a no-op for
    an unsharded network. FSDP gathers again where a backward needs it."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def values(t: torch.Tensor) -> torch.Tensor:
    """The storage of this process's values of `t` (its local shard when sharded), to read or write in place
    without autograd noticing."""
    from torch.distributed.tensor import DTensor

    return t.to_local().detach() if isinstance(t, DTensor) else t.data


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this process's shard of it when `like` is sharded, else on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device, like.dtype)


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (a sharded tensor counts its local shard)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total

