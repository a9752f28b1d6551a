"""Flow matching (rectified flow: SD3, FLUX, `digits-flow`, `toy2d-flow`): one Euler step
of an SDE with the ODE's marginals, as a Gaussian policy (METHODS.md §10).

Convention (diffusers' `FlowMatchEulerDiscreteScheduler`): x_σ = (1 − σ)·x0 + σ·ε, the model
outputs the velocity v = ε − x0, σ runs from 1 (noise) to 0 (data), the timestep handed to the
model is σ·num_train_timesteps, and the ODE step from σ to σ' is x' = x + (σ' − σ)·v with
dt = σ' − σ < 0. From v: x0_hat = x − σ·v, ε_hat = x + (1 − σ)·v, and the score of p_σ is
s = −ε_hat / σ.

The SDE dx = (v − ½g²·s)·dσ + g·dW (σ decreasing) has the ODE's marginals for any noise
level g(σ); its Euler–Maruyama step from σ to σ' is Gaussian:

    mean = x + dt·(v − ½g²·s) = x·(1 + g²·dt/(2σ)) + v·(1 + g²·(1 − σ)/(2σ))·dt
    std  = g·sqrt(|dt|)

Two published choices of g, selected by `sde` (the sampler's `eta` is the level):
- ``"flow-grpo"`` (Flow-GRPO): g = a·sqrt(σ/(1 − σ)); at σ = 1 (where it is infinite) the
  schedule's next sigma below 1 stands in for σ in the denominator, as the reference code does;
- ``"dance"`` (DanceGRPO): g = η, constant.

So a = 0 (eta = 0) is exactly the scheduler's own ODE `step`, the std includes sqrt(|dt|)
(Flow-GRPO #78 left it out of the KL), dt < 0 throughout (one sign convention for every
model: FLUX ports broke on it, Flow-GRPO #32), and the step and its log-probability are
computed in fp32 whatever the model's dtype (NaN log-probs in bf16: Flow-GRPO #177).
Re-scoring a stored step repeats exactly the same arithmetic, so the ratio before the first
update is 1 (Flow-GRPO #104, DanceGRPO #57 traced theirs to recomputing with other inputs).

The inference grid (`set_timesteps`): σ = linspace(1, 1/N, N) before the scheduler's shift, then 0,
as diffusers' FLUX pipelines pass it. The scheduler's own default, linspace(1, σ_min, N) with
σ_min = 1/num_train_timesteps, ends with a micro-step σ_min -> 0 (dt = −0.001 against −0.0526 for
the other 19 of 20 steps): its step variance is ~3,000× smaller than the step's before it, so a
method that trains the last transition (∇-GFlowNet's terminal residual, DRaFT-K=1, ReFL) sees a
~50× weaker dμ/dv and a ~2,500× larger score there. On this grid every step has the same |dt|
(shift 1) and the last step goes from σ = 1/N to the data: x_0 = x0_hat(x_{1/N}). A diffusers
pipeline reproduces our samples when given `sigmas=inference_sigmas(N)`.
"""

from __future__ import annotations

import torch

SDES = ("flow-grpo", "dance")


def is_flow(scheduler) -> bool:
    """True for diffusers' flow-matching Euler scheduler (the model outputs a velocity)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def inference_sigmas(num_steps: int) -> list[float]:
    """σ of the N inference steps before the scheduler's shift: linspace(1, 1/N, N) (then 0 is appended
    by the scheduler). The grid without the scheduler's σ_min -> 0 micro-step (module docstring)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).tolist()


def set_timesteps(scheduler, num_steps: int, device=None) -> None:
    """`scheduler.set_timesteps` on the grid of `inference_sigmas` (the scheduler applies its shift)."""
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise ValueError("this flow scheduler uses dynamic (resolution-dependent) shifting, which needs `mu`: "
                         "dynamic shifting (FLUX-style) is not supported yet; use a scheduler with a fixed `shift`")
    scheduler.set_timesteps(sigmas=inference_sigmas(num_steps), device=device)


def on_grid(scheduler, num_steps: int) -> bool:
    """True when the scheduler's current schedule is `set_timesteps(scheduler, num_steps)`'s."""
    if getattr(scheduler, "num_inference_steps", None) != num_steps or scheduler.sigmas is None:
        return False
    shift = float(scheduler.shift)
    s = torch.tensor(inference_sigmas(num_steps), dtype=torch.float64)
    expect = shift * s / (1 + (shift - 1) * s)
    return bool(torch.allclose(scheduler.sigmas[:num_steps].cpu().double(), expect, atol=1e-6))


def _per_sample(t, sample: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=sample.device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(sample.shape[0])
    if t.shape != (sample.shape[0],):
        raise ValueError(f"timestep must be a scalar or shape ({sample.shape[0]},), got {tuple(t.shape)}")
    return t


def sigma(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """σ = timestep / num_train_timesteps per sample, (B, 1, ...) float32 (any timestep, on or off
    the inference schedule: training draws them continuously)."""
    t = _per_sample(timestep, sample) / scheduler.config.num_train_timesteps
    return t.view(-1, *[1] * (sample.ndim - 1))


def schedule_sigmas(scheduler, timestep, sample: torch.Tensor):
    """(σ, σ', σ_cap) per sample from the current inference schedule: σ of `timestep`, σ' of the
    next step (0 after the last), and the largest σ below 1 (Flow-GRPO's stand-in at σ = 1)."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    t = _per_sample(timestep, sample)
    ts = scheduler.timesteps.to(sample.device, torch.float32)
    idx = (t[:, None] - ts[None, :]).abs().argmin(1)
    if not torch.allclose(ts[idx], t, rtol=0, atol=1e-3):
        raise ValueError(f"timestep(s) {t.tolist()} are not on the scheduler's current schedule "
                         f"{ts.tolist()}: step with the timesteps of `scheduler.timesteps`")
    sigmas = scheduler.sigmas.to(sample.device, torch.float32)
    below = sigmas[sigmas < 1]
    cap = below.max() if len(below) else sigmas.new_tensor(1 - 1e-3)
    shape = (-1, *[1] * (sample.ndim - 1))
    return sigmas[idx].view(shape), sigmas[idx + 1].view(shape), cap


def noise_level(sde: str, level: float, s: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """g(σ) of the SDE: `flow-grpo` level·sqrt(σ/(1 − σ)) (σ = 1 → σ_cap below), `dance` level."""
    if sde == "flow-grpo":
        return level * (s / (1 - torch.where(s >= 1, cap, s))).sqrt()
    if sde == "dance":
        return torch.full_like(s, float(level))
    raise ValueError(f"unknown sde {sde!r}: choose one of {', '.join(SDES)}")


def predictions(v: torch.Tensor, x: torch.Tensor, s: torch.Tensor):
    """(x0_hat, ε_hat) from the velocity at x_σ."""
    return x - s * v, x + (1 - s) * v


def sde_mean_std(v: torch.Tensor, x: torch.Tensor, s, s_next, g):
    """Mean and std of the SDE's Euler–Maruyama step σ -> σ' (all float32)."""
    dt = s_next - s
    eps = x + (1 - s) * v
    mean = x + dt * v + dt * g.pow(2) / (2 * s) * eps  # x + dt·(v − ½g²·s) with s = −ε/σ
    return mean, g * (-dt).sqrt()
