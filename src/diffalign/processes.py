"""How one global batch is spread over processes: the only place that knows ranks.

A run's batch is global: each of P processes holds batch_size / P consecutive rows of it
(process r holds rows [r·B, (r+1)·B)). Methods never see r or P: they take their rows of a
global tensor with `own`, their rows' positions with `positions`, gather with `gather`, and
step through global minibatches with `minibatches` (a `Share` per minibatch). `Processes.single()`
builds the one-process case for tests without an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Share:
    """This process's part of one global minibatch."""

    rows: torch.Tensor  # (n_local,) indices into this process's items (CPU), in the minibatch's order
    size: int  # items in the global minibatch, over all processes
    processes: int
    pad: bool = False  # this process holds none of the minibatch: `rows` is a padding item whose loss counts zero

    def __len__(self) -> int:
        return len(self.rows)

    def mean(self, per_item: torch.Tensor) -> torch.Tensor:
        """The local part of the global minibatch mean: with gradients averaged over processes
        (the training loop does that), the update is the mean over the whole minibatch.
        A padding share gives zero, still connected to the graph (its backward runs)."""
        if self.pad:
            return per_item.sum() * 0.0
        return per_item.mean() * (len(self.rows) * self.processes / self.size)


class Processes:
    """The processes of a run (from an accelerate `Accelerator`, or one process for tests)."""

    def __init__(self, accelerator=None, device: str | torch.device = "cpu"):
        self.acc = accelerator
        # sharded training: every process must run every forward, so a process holding nothing of a
        # minibatch gets a padding share instead of an empty one (`Share.pad`)
        self.lockstep = False
        self.count = accelerator.num_processes if accelerator else 1
        self.index = accelerator.process_index if accelerator else 0
        self.device = accelerator.device if accelerator else torch.device(device)

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "Processes":
        return cls(None, device)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def part(self) -> int | None:
        """This process's number in the names of files that each process writes apart; None for one process."""
        return None if self.count == 1 else self.index

    def check_divisible(self, n: int, key: str) -> None:
        """Refuse a global batch size that the processes cannot share evenly."""
        if n % self.count:
            from .config import ConfigError

            raise ConfigError(f"config key '{key}' = {n} is not divisible by the {self.count} processes: use a "
                              f"multiple of {self.count}")

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def positions(self, n: int) -> torch.Tensor:
        """Positions (CPU, long) of this process's rows in a global batch of n."""
        b = n // self.count
        return torch.arange(self.index * b, (self.index + 1) * b)

    def own(self, x):
        """This process's rows of `x`, a global batch (a tensor or a list)."""
        b = len(x) // self.count
        return x[self.index * b:(self.index + 1) * b]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate `t` (same shape on every process) over processes, in process order."""
        if self.acc is None:
            return t.contiguous().to(self.device)
        return self.acc.gather(t.contiguous().to(self.device))

    def gather_batches(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-batch tensors of this process's rows -> the global tensor (CPU), batch-major: row
        b·n + p is position p of batch b, so it is indexed by the slots' keys."""
        return torch.cat([self.gather(t) for t in parts]).cpu()

    def gather_any(self, t: torch.Tensor) -> torch.Tensor:
        """Like `gather`, for 1-d tensors whose length differs between processes."""
        if self.count == 1:
            return t
        n = self.gather(torch.tensor([len(t)], device=self.device)).cpu()
        padded = torch.zeros(int(n.max()), dtype=t.dtype, device=self.device)
        padded[: len(t)] = t.to(self.device)
        rows = self.gather(padded).view(self.count, -1).cpu()
        return torch.cat([rows[r, : int(n[r])] for r in range(self.count)])

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over processes (CPU); `t` itself with one process."""
        if self.count == 1:
            return t
        return self.acc.reduce(t.to(self.device), reduction="mean").cpu()

    def total(self, n: int) -> int:
        """The sum of an integer over processes."""
        return int(self.gather(torch.tensor([n], device=self.device)).sum())

    def minibatches(self, keys: torch.Tensor, n: int, generator: torch.Generator) -> list[Share]:
        """Split the items of all processes into min(n, total) global minibatches.

        `keys` are this process's items' global ids (unique over processes, e.g. the global
        sample index): the global order is the sorted keys, a permutation drawn from
        `generator` (the same on every process) shuffles it, `torch.chunk` cuts it (never an
        empty minibatch), and each process takes the items it holds. So a run gives the same
        minibatches, and the same update, for any number of processes."""
        keys = torch.as_tensor(keys, dtype=torch.long).cpu()
        everything = self.gather_any(keys).sort().values
        if len(everything) == 0:
            return []
        if len(everything.unique()) != len(everything):
            raise ValueError("minibatches: item keys must be unique over all processes")
        local_sorted, order = keys.sort()
        shares = []
        for part in everything[torch.randperm(len(everything), generator=generator)].chunk(min(n, len(everything))):
            if len(keys):
                pos = torch.searchsorted(local_sorted, part).clamp(max=len(keys) - 1)
                hit = local_sorted[pos] == part
                rows = order[pos[hit]]
            else:
                rows = keys
            if self.lockstep and len(rows) == 0:
                shares.append(Share(order[:1], len(part), self.count, pad=True))
            else:
                shares.append(Share(rows, len(part), self.count))
        return shares
