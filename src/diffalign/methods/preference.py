"""Shared pieces of the online preference methods D3PO, SPO, TailorPO(-G) (METHODS.md §2-4),
as functions the methods compose (no base class).

- `StepPairs`: preference pairs of single denoising steps. Each pair has its own
  conditions x_t^w, x_t^l (equal for the step-level methods, different for D3PO), the
  two next states x^w, x^l, the timestep, the prompt condition, a global key (for
  global minibatches), and the reference log-probs computed at collect time with the
  frozen base (`Run.reference()`).
- `step_reward`: r_t(c, x) = r(c, x0_hat(x)), one extra model pass.
- `with_reference`, `pair_micro_steps`: the training half every method shares: the
  clipped DPO loss (`losses.dpo_loss`) on log π_θ − log π_ref of each pair's step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import dpo_loss
from ..trajectory import Rows
from . import Micro


@dataclass
class PreferenceConfig:
    """The `args:` every online preference method shares; a method's Config extends it."""

    beta: float = 0.1  # DPO inverse temperature
    clip: float = 0.1  # log-ratio clipped to [log(1 - clip), log(1 + clip)]
    inner_epochs: int = 1  # passes over each epoch's pairs
    minibatches: int = 4  # optimizer steps per inner epoch (the global pairs are split)

    def validate(self, where):
        if not 0 < self.clip < 1:
            raise ValueError(f"config key '{where}.clip' must be in (0, 1)")


@dataclass
class StepPairs(Rows):
    """N step-level preference pairs on this process (every tensor has N rows)."""

    x_t_w: torch.Tensor  # (N, *shape) condition of the winner's step
    x_t_l: torch.Tensor  # (N, *shape) condition of the loser's step
    x_w: torch.Tensor  # (N, *shape) the winner's next state
    x_l: torch.Tensor  # (N, *shape) the loser's next state
    t: torch.Tensor  # (N,) timesteps
    cond: torch.Tensor | None  # (N, ...) prompt condition
    keys: torch.Tensor  # (N,) global ids, unique over processes (CPU)
    ref_w: torch.Tensor | None = None  # (N,) log π_ref(x_w | x_t_w)
    ref_l: torch.Tensor | None = None

    @classmethod
    def cat(cls, items: list["StepPairs"]) -> "StepPairs | None":
        """The non-empty items concatenated; None when there are none."""
        items = [p for p in items if len(p)]
        return super().cat(items) if items else None


@dataclass
class Branch:
    """One branching step of a rollout, kept for inspection: what was ranked and what continued."""

    step: int  # step index in the trajectory
    x_t: torch.Tensor  # (B, *shape) the shared condition
    children: torch.Tensor  # (B, k, *shape) candidates from x_t
    scores: torch.Tensor  # (B, k) step rewards
    chosen: torch.Tensor  # (B,) index of the child that continued (before any guidance)


@dataclass
class PairsBatch:
    """What `collect` hands to `micro_steps`."""

    pairs: StepPairs | None  # None: no pair on this process this epoch (all tied / filtered)
    epoch: int


def make_pairs(x_t_w, x_t_l, x_w, x_l, t, cond, keys, keep=None) -> StepPairs:
    """Pairs from batch tensors; `t` an int or (B,) tensor; `keep` a (B,) bool mask."""
    n = x_w.shape[0]
    t = torch.as_tensor(t, device=x_w.device)
    t = (t if t.is_floating_point() else t.long()).expand(n).clone()  # flow models step at float timesteps
    p = StepPairs(x_t_w, x_t_l, x_w, x_l, t, None if cond is None else cond, torch.as_tensor(keys).long().cpu())
    if keep is not None:
        p = p.select(keep.cpu().nonzero().flatten())
    return p


def pair_keys(slot, step, num_steps: int) -> torch.Tensor:
    """Global ids of this process's pairs of one rollout batch (a `Slot`) at one step (`step` an int
    or per sample): (batch · num_steps + step) · global batch + position, so pairs sort batch by
    batch, step by step, sample by sample, whatever the number of processes."""
    return (slot.index * num_steps + torch.as_tensor(step).cpu()) * len(slot.prompts) + slot.positions


def step_reward(run, sampler, x, step: int, timesteps, cond, prompts) -> torch.Tensor:
    """r_t(c, x) = r(c, x0_hat(x)) for a child x produced by step `step` (x is at timestep
    timesteps[step + 1]; after the last step x is x0 itself). Goes through `run.score`."""
    if step + 1 < len(timesteps):
        x = sampler.x0_hat(run.model, x, timesteps[step + 1].to(x.device), cond)
    return run.score(run.model.decode(x), prompts)


def with_reference(run, sampler, pairs: StepPairs | None) -> StepPairs | None:
    """Reference log-probs of the stored children under the frozen base (no grad)."""
    if pairs is None:
        return None
    with torch.no_grad(), run.reference():
        pairs.ref_w = sampler.logprob(run.model, pairs.x_t_w, pairs.t, pairs.cond, pairs.x_w)
        pairs.ref_l = sampler.logprob(run.model, pairs.x_t_l, pairs.t, pairs.cond, pairs.x_l)
    return pairs


def pair_micro_steps(run, sampler, pairs: StepPairs | None, args: PreferenceConfig, name: str, epoch: int):
    """One optimizer step per global minibatch of pairs, `args.inner_epochs` times. Pair
    counts differ between processes (ties, SPO's gap rule): every process steps through the
    same global minibatches, a process holding none of one adds a zero gradient."""
    keys = torch.empty(0, dtype=torch.long) if pairs is None else pairs.keys
    for inner in range(args.inner_epochs):
        for share in run.minibatches(keys, args.minibatches, run.generator(f"{name}-perm", epoch, inner)):
            yield Micro(_pair_loss(run, sampler, pairs, share, args), share)


def _pair_loss(run, sampler, pairs: StepPairs, share, args: PreferenceConfig):
    def compute():
        mb = pairs.select(share.rows)
        lp_w = sampler.logprob(run.model, mb.x_t_w, mb.t, mb.cond, mb.x_w)
        lp_l = sampler.logprob(run.model, mb.x_t_l, mb.t, mb.cond, mb.x_l)
        per, info = dpo_loss(lp_w - mb.ref_w, lp_l - mb.ref_l, args.beta, args.clip)
        loss = share.mean(per)
        return loss, {"loss": loss.detach(), **info}

    return compute


def pair_metrics(run, pairs: StepPairs | None, rewards: torch.Tensor | None) -> dict:
    """Pairs kept (this process), and the training-batch reward (None: labels came from people)."""
    m = {"pairs": float(0 if pairs is None else len(pairs))}
    if rewards is not None:
        g = run.gather(rewards).cpu()
        m.update(reward_mean=float(g.mean()), reward_std=float(g.std()))
    return m
