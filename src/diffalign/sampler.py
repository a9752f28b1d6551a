"""The Sampler: how a model draws samples, as one object used everywhere samples are drawn
(training rollouts, evaluation, `diffalign sample`, the benchmark, path KL, offline pairs).

An aligned model is (weights, sampler). The sampler holds the settings (steps, eta,
guidance, log-prob reduction) and two optional hooks:

- `correction(model, x_t, t, cond) -> Δ` is added to the score ∇_x log p_t(x_t) at every
  step (e.g. DDO's Doob h-transform ∇_x log h_t). In noise terms ε ← ε − sqrt(1 − ā_t)·Δ,
  applied to the model output in its own prediction type (`sampling.output_shift`).
  A correction with `uses_output = True` also gets the (guided, uncorrected) model output
  at x_t as `output=`, so it need not call the model again (`diffalign.doob`).
- `transition(model, output, t, x_t, *, generator, prev_sample, with_logprob) -> StepOutput`
  replaces the Gaussian DDIM/DDPM/flow-SDE step (`sampling.step_with_logprob`) entirely.

For flow-matching models (`diffalign.flow`) `eta` is the SDE's noise level and `sde` its
schedule; `sde_steps` (MixGRPO) restricts the SDE to some step indices and runs the ODE
(eta = 0, no log-prob: NaN in the trajectory) at the others.

Both apply in `predict`/`step`, so re-scoring under the same sampler (`logprob`) scores
exactly the policy that sampled. The loop of `sample` is plain (no gradients) or
differentiable at chosen steps (`grad_steps`, with gradient checkpointing). Methods that
branch (k children from one x_t) write their loop with `step` and `children`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .sampling import StepOutput, noise_coefficient, output_shift, set_timesteps, step_with_logprob, timesteps_ready, \
    x0_from_output
from .trajectory import Trajectory


@dataclass
class Children:
    """k children drawn from the same x_t: one model call, shared mean and std."""

    samples: torch.Tensor  # (B, k, *shape)
    log_probs: torch.Tensor | None  # (B, k)
    mean: torch.Tensor  # (B, *shape)
    std: torch.Tensor  # broadcastable to one child
    x0_pred: torch.Tensor  # (B, *shape)
    output: torch.Tensor  # (B, *shape) the model output at x_t


@dataclass
class Sampler:
    num_steps: int = 20  # denoising steps
    eta: float = 1.0  # DDIM eta (> 0 for log-probs; 1 = DDPM variance)
    guidance_scale: float = 1.0  # classifier-free guidance (1 = off)
    reduction: str = "sum"  # log-prob reduction: 'sum' (exact) or 'mean' (per element, reference-code scale)
    correction: Callable | None = None  # (model, x_t, t, cond) -> Δ added to the score; None = none
    transition: Callable | None = None  # replaces the Gaussian step; None = DDIM/DDPM/flow SDE with log-prob
    sde: str = "flow-grpo"  # flow models: the SDE's noise schedule ('flow-grpo' or 'dance'; `diffalign.flow`)
    sde_steps: tuple[int, ...] | None = None  # flow models: step indices run as the SDE, the ODE elsewhere; None = all
    solver: str | None = None  # a deterministic diffusers solver instead of the own step (`diffalign.solvers`)
    order: int = 2  # the solver's order (dpmsolver++, unipc)

    @classmethod
    def from_config(cls, sampling, model) -> "Sampler":
        """From a `SamplingConfig`; an unset guidance scale is the model's default (resolved once, here)."""
        g = model.guidance_scale if sampling.guidance_scale is None else sampling.guidance_scale
        return cls(num_steps=sampling.num_steps, eta=sampling.eta, guidance_scale=float(g), reduction=sampling.logprob,
                   sde=sampling.sde, solver=sampling.scheduler, order=sampling.order)

    def replace(self, **changes) -> "Sampler":
        return dataclasses.replace(self, **changes)

    # ---- one step ----------------------------------------------------------------------
    def timesteps(self, model) -> torch.Tensor:
        """The scheduler's timesteps for `num_steps` (first = noisiest), on the model's device
        (`sampling.set_timesteps`: flow models on a grid without the scheduler's last micro-step)."""
        set_timesteps(model.scheduler, self.num_steps, device=model.device)
        return model.scheduler.timesteps

    def _ready(self, model) -> None:
        if not timesteps_ready(model.scheduler, self.num_steps):
            set_timesteps(model.scheduler, self.num_steps, device=model.device)

    def noise(self, model, n: int, generator=None) -> torch.Tensor:
        """x_T for n samples (one generator, or a list of one per sample)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((n, *model.sample_shape), generator=generator, device=model.device)

    def predict(self, model, x, t, cond) -> torch.Tensor:
        """Model output with classifier-free guidance u + g (c - u), plus the score correction.

        Guidance is off when g == 1 or the model has no null condition; the conditional and
        unconditional halves go through the denoiser as one batch. A guidance-distilled model
        (`model.embedded_guidance`, FLUX.1-dev) gets g as an input of the denoiser instead."""
        g = self.guidance_scale
        if getattr(model, "embedded_guidance", None) is not None and cond is not None:
            cond, g = model.embedded_guidance(cond, g), 1.0
        null = model.null_condition(x.shape[0]) if g != 1.0 else None
        if null is None or cond is None:
            out = model.predict_noise(x, t, cond)
        else:
            t = torch.as_tensor(t, device=x.device)
            t2 = torch.cat([t.expand(x.shape[0])] * 2)
            out_u, out_c = model.predict_noise(torch.cat([x, x]), t2, torch.cat([null, cond])).chunk(2)
            out = out_u + g * (out_c - out_u)
        if self.correction is not None:
            d_score = self.correction(model, x, t, cond, output=out) if getattr(self.correction, "uses_output", False) \
                else self.correction(model, x, t, cond)
            out = out + output_shift(model.scheduler, -noise_coefficient(model.scheduler, t, x) * d_score, t, x)
        return out

    def step(self, model, x, t, cond, *, generator=None, prev_sample=None, with_logprob: bool = True,
             output: torch.Tensor | None = None, eta: float | None = None) -> StepOutput:
        """x_t -> x_{t-1}: sampled from `generator`, or the given `prev_sample` scored (`eta`: this
        step's noise level instead of the sampler's)."""
        self._ready(model)
        out = self.predict(model, x, t, cond) if output is None else output
        if self.transition is not None:
            return self.transition(model, out, t, x, generator=generator, prev_sample=prev_sample,
                                   with_logprob=with_logprob)
        return step_with_logprob(model.scheduler, out, t, x, eta=self.eta if eta is None else eta, generator=generator,
                                 prev_sample=prev_sample, reduction=self.reduction, with_logprob=with_logprob,
                                 sde=self.sde)

    def logprob(self, model, x_t, t, cond, x_prev) -> torch.Tensor:
        """log π(x_prev | x_t, c) under `model` now (gradients flow to its parameters); t may be (B,)."""
        return self.step(model, x_t, torch.as_tensor(t, device=x_t.device), cond, prev_sample=x_prev).log_prob

    def rescore(self, model, traj: Trajectory, step, rows=None) -> torch.Tensor:
        """Log-prob under `model` now of the stored transitions at `step` (an int, or one per row)."""
        rows = torch.arange(len(traj), device=traj.latents.device) if rows is None else \
            torch.as_tensor(rows, dtype=torch.long).to(traj.latents.device)
        step = torch.as_tensor(step, dtype=torch.long).to(traj.latents.device).expand(len(rows))
        cond = None if traj.cond is None else traj.cond[rows]
        t = traj.timesteps.to(traj.latents.device)[step]
        return self.logprob(model, traj.latents[rows, step], t, cond, traj.latents[rows, step + 1])

    def children(self, model, x, t, cond, k: int, generator=None, with_logprob: bool = True,
                 output: torch.Tensor | None = None) -> Children:
        """k children of x_t from one model call, drawn one after another from `generator`."""
        if k < 1:
            raise ValueError(f"k (children per branch) must be >= 1, got {k}")
        self._ready(model)
        out = self.predict(model, x, t, cond) if output is None else output
        steps = [self.step(model, x, t, cond, generator=generator, with_logprob=with_logprob, output=out)
                 for _ in range(k)]
        lps = torch.stack([s.log_prob for s in steps], dim=1) if with_logprob else None
        return Children(torch.stack([s.prev_sample for s in steps], dim=1), lps, steps[0].mean, steps[0].std,
                        steps[0].x0_pred, out)

    def x0_hat(self, model, x, t, cond) -> torch.Tensor:
        """One extra model pass: the Tweedie prediction of x0 from x at timestep t."""
        return x0_from_output(model.scheduler, self.predict(model, x, t, cond), t, x)

    # ---- the loop ------------------------------------------------------------------------
    def sample(self, model, prompts: Sequence[str], *, generator=None, latents: torch.Tensor | None = None,
               with_logprob: bool = True, grad_steps: Iterable[int] | None = None,
               checkpoint: bool = True) -> Trajectory:
        """One trajectory per prompt.

        `grad_steps`: step indices (0 = first, noisiest step) whose model call keeps its graph
        (differentiable mode); all others run without gradients, which cuts the chain there.
        With `checkpoint` the model call is recomputed in backward (less memory)."""
        n = len(prompts)
        grad_steps = set(grad_steps or ())
        cond = model.encode_prompts(list(prompts))
        if getattr(model, "embedded_guidance", None) is not None and cond is not None:  # stored with this sampler's guidance
            cond = model.embedded_guidance(cond, self.guidance_scale)
        if latents is None:
            latents = self.noise(model, n, generator)
        elif latents.shape != (n, *model.sample_shape):
            raise ValueError(f"latents shape {tuple(latents.shape)} != {(n, *model.sample_shape)}")
        if self.solver is not None:
            return self._solve(model, list(prompts), cond, latents, with_logprob, grad_steps, checkpoint)
        timesteps = self.timesteps(model)
        x = latents
        xs, logps, outs, x0s = [x], [], [], []
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i in grad_steps):
                out = self._output(model, x, t, cond, checkpointed=i in grad_steps and checkpoint)
                sde = self.sde_steps is None or i in self.sde_steps
                step = self.step(model, x, t, cond, generator=generator, with_logprob=with_logprob and sde, output=out,
                                 eta=None if sde else 0.0)
            x = step.prev_sample
            xs.append(x)
            logps.append(step.log_prob if with_logprob and sde else torch.full((n,), float("nan"), device=x.device))
            outs.append(out)
            x0s.append(step.x0_pred)
        return Trajectory(prompts=list(prompts), cond=cond, timesteps=timesteps.detach().cpu(),
                          latents=torch.stack(xs, dim=1), log_probs=torch.stack(logps, dim=1) if with_logprob else None,
                          outputs=torch.stack(outs, dim=1), x0_preds=torch.stack(x0s, dim=1))

    def _output(self, model, x, t, cond, checkpointed: bool) -> torch.Tensor:
        """`predict` at one step of a loop; `checkpointed`: recomputed in backward (t is bound now, since the
        recomputation runs after the loop has moved on)."""
        if checkpointed:
            return grad_checkpoint(lambda x_, t_=t: self.predict(model, x_, t_, cond), x, use_reentrant=False)
        return self.predict(model, x, t, cond)

    def _solve(self, model, prompts, cond, latents, with_logprob, grad_steps, checkpoint) -> Trajectory:
        """`sample` through the diffusers solver `self.solver` (`diffalign.solvers`): no log-probs, no x0s."""
        from . import solvers

        if with_logprob:
            raise ValueError(f"sampling.scheduler = {self.solver!r} is a deterministic solver, whose steps have no "
                             "log-probability: likelihood methods sample with the model's own step "
                             "(sampling.scheduler: null, eta > 0)")
        if self.correction is not None or self.transition is not None:
            raise ValueError(f"sampling.scheduler = {self.solver!r} integrates the model's own ODE: it cannot apply "
                             "this method's score correction or transition; use sampling.scheduler: null")

        def predict(x, t, i):
            with torch.set_grad_enabled(i in grad_steps):
                return self._output(model, x, t, cond, checkpointed=i in grad_steps and checkpoint)

        solver = solvers.build(model.scheduler, self.solver, self.order)
        timesteps, xs, outs = solvers.solve(solver, self.num_steps, latents, predict, device=model.device)
        return Trajectory(prompts=prompts, cond=cond, timesteps=timesteps.detach().cpu(), latents=torch.stack(xs, dim=1),
                          log_probs=None, outputs=torch.stack(outs, dim=1), x0_preds=None)
