"""Trajectories: what sampling records per denoising step.

Step i goes from `latents[:, i]` (x_t at `timesteps[i]`) to `latents[:, i + 1]`.
`log_probs[:, i]` is log π(x_{i+1} | x_i) under the sampler that drew it, so
re-scoring a stored step before any update reproduces it exactly (ratio 1).
The sampling loop itself is `Sampler.sample` (`diffalign.sampler`).

`Rows` is the shared base of what methods keep from trajectories (step pairs,
transitions, replay buffers): a dataclass of tensors with one row per item.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class Rows:
    """Mixin for a dataclass whose fields are tensors with one row per item (or None), among
    them `keys`: the items' global ids, on the CPU; the other fields may live on a device."""

    keys: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows):
        """The items `rows` (an index tensor on any device)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return type(self)(**{f.name: None if (v := getattr(self, f.name)) is None else v[rows.to(v.device)]
                             for f in fields(self)})

    @classmethod
    def cat(cls, items: list):
        """All items of `items` in order (each field on the last item's device)."""
        last = items[-1]
        return cls(**{f.name: None if (v := getattr(last, f.name)) is None else
                      torch.cat([getattr(i, f.name).to(v.device) for i in items]) for f in fields(cls)})


@dataclass
class Trajectory:
    """A batch of B sampled trajectories of T steps."""

    prompts: list[str]
    cond: torch.Tensor | None  # (B, ...) prompt condition, or None (unconditional model)
    timesteps: torch.Tensor  # (T,) on the CPU
    latents: torch.Tensor  # (B, T + 1, *shape): x_T ... x_0
    log_probs: torch.Tensor | None  # (B, T), None when sampled without log-probs
    outputs: torch.Tensor  # (B, T, *shape) guided (and corrected) model outputs (noise for ε-prediction)
    x0_preds: torch.Tensor | None  # (B, T, *shape) the scheduler's x0 prediction at each step (None: a solver's)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows) -> "Trajectory":
        """The sub-batch `rows` (an index tensor on any device, or a slice)."""
        if isinstance(rows, slice):
            prompts = self.prompts[rows]
        else:
            rows = torch.as_tensor(rows, dtype=torch.long).to(self.latents.device)
            prompts = [self.prompts[i] for i in rows.tolist()]
        pick = lambda v: None if v is None else v[rows]  # noqa: E731
        return Trajectory(prompts=prompts, cond=pick(self.cond), timesteps=self.timesteps, latents=self.latents[rows],
                          log_probs=pick(self.log_probs), outputs=self.outputs[rows], x0_preds=pick(self.x0_preds))

    @staticmethod
    def cat(trajs: list["Trajectory"]) -> "Trajectory":
        """Concatenate batches sampled with the same sampler."""
        first = trajs[0]
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(t, name) for t in trajs])  # noqa: E731
        return Trajectory(prompts=[p for t in trajs for p in t.prompts], cond=cat("cond"), timesteps=first.timesteps,
                          latents=cat("latents"), log_probs=cat("log_probs"), outputs=cat("outputs"),
                          x0_preds=cat("x0_preds"))

    @staticmethod
    def from_steps(prompts, cond, timesteps, xs: list, log_probs: list | None, outputs: list, x0_preds: list):
        """A trajectory from per-step lists (a loop written out by a method: xs has T + 1 entries)."""
        return Trajectory(prompts=list(prompts), cond=cond, timesteps=torch.as_tensor(timesteps).detach().cpu(),
                          latents=torch.stack(xs, dim=1),
                          log_probs=None if log_probs is None else torch.stack(log_probs, dim=1),
                          outputs=torch.stack(outputs, dim=1), x0_preds=torch.stack(x0_preds, dim=1))

    def x_t(self, i: int) -> torch.Tensor:
        return self.latents[:, i]

    def x_prev(self, i: int) -> torch.Tensor:
        return self.latents[:, i + 1]
