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

`FlowSDE` is this family's `diffalign.steps.Family`: what `diffalign.sampling` asks of a flow scheduler.
"""

from __future__ import annotations

import torch

from .steps import Family, broadcastable, per_sample, register

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


def image_shift(scheduler, image_seq_len: int):
    """A scheduler with dynamic (resolution-dependent) shifting, fixed to one image size: the scheduler with
    the static `shift` it applies there, and μ. A pipeline computes μ from the image's token count
    (`calculate_shift` with the scheduler's base/max sequence lengths and shifts, as FLUX's and SD3's
    pipelines do) and warps σ by exp(μ)/(exp(μ) + 1/σ − 1) ("exponential") or μ/(μ + 1/σ − 1) ("linear"),
    which are exactly the static shift s·σ/(1 + (s − 1)·σ) with s = exp(μ) or μ. A scheduler without dynamic
    shifting is returned as it is (μ None)."""
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    if not c.get("use_dynamic_shifting", False):
        return scheduler, None
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    kind = c.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"unknown time_shift_type {kind!r} in the flow scheduler's config")
    shift = math.exp(mu) if kind == "exponential" else mu
    return type(scheduler).from_config({**c, "use_dynamic_shifting": False, "shift": shift}), mu


def set_timesteps(scheduler, num_steps: int, device=None) -> None:
    """`scheduler.set_timesteps` on the grid of `inference_sigmas` (the scheduler applies its shift)."""
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise ValueError("this flow scheduler uses dynamic (resolution-dependent) shifting, which needs the image "
                         "size: fix it with `diffalign.flow.image_shift(scheduler, image_seq_len)` (pipeline folders "
                         "loaded by diffalign are fixed to their resolution already)")
    scheduler.set_timesteps(sigmas=inference_sigmas(num_steps), device=device)


def on_grid(scheduler, num_steps: int) -> bool:
    """True when the scheduler's current schedule is `set_timesteps(scheduler, num_steps)`'s."""
    if getattr(scheduler, "num_inference_steps", None) != num_steps or scheduler.sigmas is None:
        return False
    shift = float(scheduler.shift)
    s = torch.tensor(inference_sigmas(num_steps), dtype=torch.float64)
    expect = shift * s / (1 + (shift - 1) * s)
    return bool(torch.allclose(scheduler.sigmas[:num_steps].cpu().double(), expect, atol=1e-6))


def sigma(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """σ = timestep / num_train_timesteps per sample, (B, 1, ...) float32 (any timestep, on or off
    the inference schedule: training draws them continuously)."""
    return broadcastable(per_sample(timestep, sample, torch.float32) / scheduler.config.num_train_timesteps, sample)


def schedule_sigmas(scheduler, timestep, sample: torch.Tensor):
    """(σ, σ', σ_cap) per sample from the current inference schedule: σ of `timestep`, σ' of the
    next step (0 after the last), and the largest σ below 1 (Flow-GRPO's stand-in at σ = 1)."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    t = per_sample(timestep, sample, torch.float32)
    ts = scheduler.timesteps.to(sample.device, torch.float32)
    idx = (t[:, None] - ts[None, :]).abs().argmin(1)
    if not torch.allclose(ts[idx], t, rtol=0, atol=1e-3):
        raise ValueError(f"timestep(s) {t.tolist()} are not on the scheduler's current schedule "
                         f"{ts.tolist()}: step with the timesteps of `scheduler.timesteps`")
    sigmas = scheduler.sigmas.to(sample.device, torch.float32)
    below = sigmas[sigmas < 1]
    cap = below.max() if len(below) else sigmas.new_tensor(1 - 1e-3)
    return broadcastable(sigmas[idx], sample), broadcastable(sigmas[idx + 1], sample), cap


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


@register
class FlowSDE(Family):
    """diffusers' `FlowMatchEulerDiscreteScheduler`: the model outputs a velocity, a step is the SDE above
    (noise level `eta`, schedule `sde`; eta = 0 is the scheduler's own Euler step), x_σ = (1 − σ)·x0 + σ·ε."""

    @staticmethod
    def matches(scheduler):
        return is_flow(scheduler)

    def set_timesteps(self, num_steps, device=None):
        """The grid without the scheduler's last micro-step (`inference_sigmas`)."""
        set_timesteps(self.scheduler, num_steps, device)

    def timesteps_ready(self, num_steps):
        return on_grid(self.scheduler, num_steps)

    def mean_std(self, model_output, timestep, sample, eta, sde="flow-grpo"):
        """The Euler–Maruyama step σ -> σ' (`sde_mean_std`), in fp32; x0 and ε in the sample's dtype."""
        s, s_next, cap = schedule_sigmas(self.scheduler, timestep, sample)
        x, v = sample.float(), model_output.float()
        mean, std = sde_mean_std(v, x, s, s_next, noise_level(sde, eta, s, cap))
        x0, eps = (p.to(sample.dtype) for p in predictions(v, x, s))
        return mean, std, x0, eps

    def alpha_bar(self, timestep, sample):
        """The variance-preserving equivalent (1 − σ)² / ((1 − σ)² + σ²)."""
        s = sigma(self.scheduler, timestep, sample)
        return ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).to(sample.dtype)

    def x0_from_output(self, model_output, timestep, sample):
        """x_t − σ·v."""
        return predictions(model_output, sample, sigma(self.scheduler, timestep, sample).to(sample.dtype))[0]

    def training_target(self, x0, noise, timestep):
        """The velocity noise − x0."""
        return noise - x0

    def output_shift(self, d_eps, timestep, sample):
        """ε = x_t + (1 − σ)·v: d_eps / (1 − σ) for σ < 1, and 0 at σ = 1, where x_t is the noise itself,
        ε_hat = x_t whatever v is, and the score −x_t is the same for every tilt of the data
        (h_1(x) = E[h(X_0) | X_1 = x] does not depend on x, so an exact correction is 0 there and an
        estimated one is estimator noise; dividing by 1 − σ would multiply it without bound)."""
        s = sigma(self.scheduler, timestep, sample)
        inside = s < 1
        return torch.where(inside, d_eps.float() / torch.where(inside, 1 - s, torch.ones_like(s)),
                           torch.zeros_like(s)).to(sample.dtype)

    def noise_coefficient(self, timestep, sample):
        """σ."""
        return sigma(self.scheduler, timestep, sample).to(sample.dtype)

    def add_noise(self, x0, noise, timestep):
        """(1 − σ)·x0 + σ·noise, any σ = timestep / num_train_timesteps."""
        s = sigma(self.scheduler, timestep, x0).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def random_timesteps(self, n, generator=None):
        """σ = shift·u / (1 + (shift − 1)·u) for u ~ U(0, 1) (the inference grid's warp, made continuous),
        as timesteps σ·T."""
        u, shift = torch.rand(n, generator=generator, dtype=torch.float64), float(self.scheduler.shift)
        return (shift * u / (1 + (shift - 1) * u) * self.scheduler.config.num_train_timesteps).float()
