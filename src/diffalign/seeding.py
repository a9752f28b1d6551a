"""Derived seeds: every random draw in a run comes from a generator seeded by
(run seed, purpose, epoch, ..., sample index), so runs reproduce exactly, resume
without saved RNG state, and give the same samples for any number of processes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any parts (stable across runs and platforms)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generators(device, *parts, indices) -> list[torch.Generator]:
    """One generator per sample index, seeded by (parts..., index)."""
    dev = torch.device(device)
    return [torch.Generator(dev).manual_seed(seed_for(*parts, i)) for i in indices]


@dataclass
class Slot:
    """One rollout batch of an epoch, as this process holds it."""

    index: int  # the batch's index in the epoch
    prompts: list[str]  # the global batch's prompts (the same on every process)
    local: list[str]  # this process's prompts
    positions: torch.Tensor  # (B,) positions of this process's rows in the global batch (CPU)
    generators: list[torch.Generator]  # one per local sample, seeded by (run seed, purpose, epoch, index, position)

    @property
    def keys(self) -> torch.Tensor:
        """Global sample ids of this process's rows over the epoch, batch-major: index · n + position."""
        return self.index * len(self.prompts) + self.positions


class Seeds:
    """A run's random draws: generators seeded by (run seed, purpose, ...), prompt draws and rollout
    batches. `processes` (a `processes.Processes`) says which rows of a global batch are this process's."""

    def __init__(self, seed: int, processes, prompts: list[str], device="cpu"):
        self.seed, self.processes, self.prompts, self.device = seed, processes, prompts, device

    def generator(self, *parts) -> torch.Generator:
        """A CPU generator seeded by (run seed, *parts): the same on every process."""
        return torch.Generator().manual_seed(seed_for(self.seed, *parts))

    def draw_prompts(self, *parts, n: int) -> list[str]:
        """n prompts drawn uniformly (with replacement) from the training prompts."""
        idx = torch.randint(len(self.prompts), (n,), generator=self.generator("prompts", *parts)).tolist()
        return [self.prompts[i] for i in idx]

    def sample_generators(self, *parts, n_global: int) -> list[torch.Generator]:
        """One generator per sample of this process's rows, seeded by (run seed, *parts, global position)."""
        return generators(self.device, self.seed, *parts, indices=self.processes.positions(n_global).tolist())

    def slots(self, epoch: int, purpose: str, n: int, batches: int, draw=None) -> list[Slot]:
        """The epoch's rollout batches: `draw(b)` gives batch b's global prompts (default: n prompts drawn
        by (epoch, b)); each sample's generator is seeded by (purpose, epoch, b, position)."""
        out = []
        for b in range(batches):
            prompts = draw(b) if draw else self.draw_prompts(epoch, b, n=n)
            out.append(Slot(b, prompts, self.processes.own(prompts), self.processes.positions(len(prompts)),
                            self.sample_generators(purpose, epoch, b, n_global=len(prompts))))
        return out
