"""Trajectories: sampling a model while recording, per step, x_t, x_prev, t, log-prob,
noise prediction and x0_hat.

Three modes share one loop (`sample`):
- plain: no gradients (online RL rollouts: DDPO, D3PO);
- branching: at chosen steps, k children are drawn from the same x_t and a
  caller-supplied `choose` picks which one continues (SPO, TailorPO);
- differentiable: gradients flow through the model at chosen steps, with
  gradient checkpointing (AlignProp, DRaFT, nabla-GFlowNet, TailorPO-G).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .models.base import DiffusionModel
from .sampling import step_with_logprob, x0_from_eps


def predict_eps(model: DiffusionModel, x, t, cond, guidance_scale: float):
    """Noise prediction with classifier-free guidance: eps_u + g (eps_c - eps_u).

    Guidance is off when g == 1 or the model has no null condition. The conditional and
    unconditional halves go through the denoiser as one batch.
    """
    null = model.null_condition(x.shape[0]) if guidance_scale != 1.0 else None
    if null is None or cond is None:
        return model.predict_noise(x, t, cond)
    t = torch.as_tensor(t, device=x.device)
    t2 = torch.cat([t.expand(x.shape[0])] * 2)
    out = model.predict_noise(torch.cat([x, x]), t2, torch.cat([null, cond]))
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


@dataclass
class Branch:
    """k children drawn from the same x_t at one step (branching mode)."""

    step: int  # index into the trajectory's steps
    timestep: int
    x_t: torch.Tensor  # (B, *shape)
    children: torch.Tensor  # (B, k, *shape)
    log_probs: torch.Tensor  # (B, k)
    mean: torch.Tensor  # (B, *shape), shared by the children
    std: torch.Tensor
    chosen: torch.Tensor | None = None  # (B,) index of the child that continued
    info: dict = field(default_factory=dict)  # whatever `choose` wants to keep (scores, ...)


@dataclass
class Trajectory:
    """A batch of sampled trajectories; step i goes from latents[:, i] to latents[:, i + 1]."""

    prompts: list[str]
    cond: torch.Tensor | None
    timesteps: torch.Tensor  # (T,)
    latents: torch.Tensor  # (B, T + 1, *shape): x_T ... x_0
    log_probs: torch.Tensor | None  # (B, T)
    eps: torch.Tensor  # (B, T, *shape) guided noise predictions
    x0_preds: torch.Tensor  # (B, T, *shape)
    eta: float
    guidance_scale: float
    branches: list[Branch] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def select(self, rows) -> "Trajectory":
        """The sub-batch `rows` (index tensor or slice); branches are dropped."""
        return Trajectory(
            prompts=[self.prompts[i] for i in torch.arange(len(self.prompts))[rows].tolist()],
            cond=None if self.cond is None else self.cond[rows],
            timesteps=self.timesteps,
            latents=self.latents[rows],
            log_probs=None if self.log_probs is None else self.log_probs[rows],
            eps=self.eps[rows],
            x0_preds=self.x0_preds[rows],
            eta=self.eta,
            guidance_scale=self.guidance_scale,
        )

    @staticmethod
    def cat(trajs: list["Trajectory"]) -> "Trajectory":
        """Concatenate batches sampled with the same settings."""
        first = trajs[0]
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(t, name) for t in trajs])
        return Trajectory(
            prompts=[p for t in trajs for p in t.prompts], cond=cat("cond"), timesteps=first.timesteps,
            latents=cat("latents"), log_probs=cat("log_probs"), eps=cat("eps"), x0_preds=cat("x0_preds"),
            eta=first.eta, guidance_scale=first.guidance_scale,
        )

    def x_t(self, i: int) -> torch.Tensor:
        return self.latents[:, i]

    def x_prev(self, i: int) -> torch.Tensor:
        return self.latents[:, i + 1]


ChooseFn = Callable[[Branch], torch.Tensor]


def sample(
    model: DiffusionModel,
    prompts: Sequence[str],
    *,
    num_steps: int | None = None,
    eta: float = 1.0,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    reduction: str = "sum",
    with_logprob: bool = True,
    grad_steps: Iterable[int] | None = None,
    checkpoint: bool = True,
    branch_steps: Iterable[int] | None = None,
    k: int = 2,
    choose: ChooseFn | None = None,
) -> Trajectory:
    """Sample one trajectory per prompt.

    - `grad_steps`: step indices (0 = first, noisiest step) whose model call keeps its
      graph (differentiable mode); all others run without gradients, which cuts the
      chain there. With `checkpoint` the model call is recomputed in backward.
    - `branch_steps` + `choose`: at those steps draw `k` children from the same x_t
      (one model call, shared mean); `choose(branch)` returns the (B,) index of the
      child that continues. Branches are kept in `trajectory.branches`.
    """
    device = model.device
    n = len(prompts)
    num_steps = num_steps or model.num_inference_steps
    g = model.guidance_scale if guidance_scale is None else guidance_scale
    grad_steps = set(grad_steps or ())
    branch_steps = set(branch_steps or ())
    if branch_steps and choose is None:
        raise ValueError("branch_steps needs a `choose` function that picks the child to continue")
    if k < 1:
        raise ValueError(f"k (children per branch) must be >= 1, got {k}")

    scheduler = model.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    cond = model.encode_prompts(list(prompts))
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor((n, *model.sample_shape), generator=generator, device=device)
    elif latents.shape != (n, *model.sample_shape):
        raise ValueError(f"latents shape {tuple(latents.shape)} != {(n, *model.sample_shape)}")

    x = latents
    xs, logps, epss, x0s, branches = [x], [], [], [], []
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i in grad_steps):
            if i in grad_steps and checkpoint:
                # t is bound now: the recomputation runs in backward, after the loop moved on
                eps = grad_checkpoint(lambda x_, t_=t: predict_eps(model, x_, t_, cond, g), x, use_reentrant=False)
            else:
                eps = predict_eps(model, x, t, cond, g)
            if i in branch_steps:
                out, br = _branch(scheduler, eps, t, x, eta, k, generator, reduction, with_logprob, i, choose)
                branches.append(br)
            else:
                out = step_with_logprob(
                    scheduler, eps, t, x, eta=eta, generator=generator, reduction=reduction, with_logprob=with_logprob
                )
        x = out.prev_sample
        xs.append(x)
        logps.append(out.log_prob)
        epss.append(eps)
        x0s.append(out.x0_pred)

    return Trajectory(
        prompts=list(prompts),
        cond=cond,
        timesteps=timesteps.detach().cpu(),
        latents=torch.stack(xs, dim=1),
        log_probs=torch.stack(logps, dim=1) if with_logprob else None,
        eps=torch.stack(epss, dim=1),
        x0_preds=torch.stack(x0s, dim=1),
        eta=eta,
        guidance_scale=g,
        branches=branches,
    )


def _branch(scheduler, eps, t, x, eta, k, generator, reduction, with_logprob, i, choose):
    """Draw k children of x (shared mean and std), let `choose` pick one per sample."""
    outs = [
        step_with_logprob(scheduler, eps, t, x, eta=eta, generator=generator, reduction=reduction,
                          with_logprob=with_logprob)
        for _ in range(k)
    ]
    children = torch.stack([o.prev_sample for o in outs], dim=1)
    lps = torch.stack([o.log_prob for o in outs], dim=1) if with_logprob else None
    br = Branch(step=i, timestep=int(t), x_t=x, children=children, log_probs=lps, mean=outs[0].mean, std=outs[0].std)
    chosen = torch.as_tensor(choose(br), device=x.device).long()
    if chosen.shape != (x.shape[0],) or bool(((chosen < 0) | (chosen >= k)).any()):
        raise ValueError(f"choose must return ({x.shape[0]},) child indices in [0, {k}), got {chosen}")
    br.chosen = chosen
    rows = torch.arange(x.shape[0], device=x.device)
    out = outs[0]
    out.prev_sample = children[rows, chosen]
    out.log_prob = lps[rows, chosen] if with_logprob else None
    return out, br


def rescore(
    model: DiffusionModel,
    traj: Trajectory,
    step: int | torch.Tensor,
    *,
    reduction: str = "sum",
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-prob under the model's current weights of the stored x_prev at `step`.

    Gradients flow to the model's parameters. Before any update this reproduces
    `traj.log_probs[:, step]` exactly (ratio 1). `rows` picks a subset of the batch.
    """
    if model.scheduler.num_inference_steps != traj.num_steps:
        model.scheduler.set_timesteps(traj.num_steps, device=traj.latents.device)
    rows = slice(None) if rows is None else rows
    x_t, x_prev = traj.latents[rows, step], traj.latents[rows, step + 1]
    cond = None if traj.cond is None else traj.cond[rows]
    t = traj.timesteps[step]
    eps = predict_eps(model, x_t, t.to(x_t.device), cond, traj.guidance_scale)
    out = step_with_logprob(model.scheduler, eps, t, x_t, eta=traj.eta, prev_sample=x_prev, reduction=reduction)
    return out.log_prob


def x0_hat(model: DiffusionModel, x: torch.Tensor, t, cond, guidance_scale: float) -> torch.Tensor:
    """One extra model pass: the Tweedie prediction of x0 from x at timestep t."""
    return x0_from_eps(model.scheduler, x, predict_eps(model, x, t, cond, guidance_scale), t)
