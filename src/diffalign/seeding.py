"""Derived seeds: every random draw in a run comes from a generator seeded by
(run seed, purpose, epoch, ..., sample index), so runs reproduce exactly, resume
without saved RNG state, and give the same samples for any number of processes."""

from __future__ import annotations

import hashlib

import torch


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any parts (stable across runs and platforms)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generators(device, *parts, indices) -> list[torch.Generator]:
    """One generator per sample index, seeded by (parts..., index)."""
    dev = torch.device(device)
    return [torch.Generator(dev).manual_seed(seed_for(*parts, i)) for i in indices]
