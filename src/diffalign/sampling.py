"""One denoising step as a Gaussian policy: the previous sample, its log-probability,
and the step's mean and std, for diffusers' `DDIMScheduler` and `DDPMScheduler`, and for
`FlowMatchEulerDiscreteScheduler` through the SDE of `diffalign.flow`.

Every function here reads the scheduler's kind: for flow models the output is a velocity,
`eta` is the SDE's noise level and `alpha_bar` the variance-preserving equivalent
(1 − σ)² / ((1 − σ)² + σ²).

The mean is computed exactly as the scheduler's own `step` computes it (same x0
prediction, same clipping), so with the same noise `prev_sample` equals
`scheduler.step(...).prev_sample`; the tests hold it to that.

Log-probability reduction:
- ``"sum"`` (default): the exact log-likelihood of `prev_sample`, summed over all
  non-batch elements. Scale grows with the number of elements.
- ``"mean"``: the per-element average, as the reference DDPO / D3PO code does;
  published clip ranges and betas (e.g. DDPO's 1e-4 clip) assume this scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import flow

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
REDUCTIONS = ("sum", "mean")


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}
    log_prob: torch.Tensor | None  # (B,) log pi(prev_sample | sample), None if not requested
    mean: torch.Tensor  # mean of x_{t-1} given x_t
    std: torch.Tensor  # std of x_{t-1}, broadcastable to the sample (shape (B, 1, ...))
    x0_pred: torch.Tensor  # the scheduler's prediction of x_0 (after clipping, as the scheduler uses it)
    eps_pred: torch.Tensor  # the implied noise prediction


def _per_sample(value, sample: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor -> (B, 1, 1, ...) broadcastable against `sample`."""
    value = torch.as_tensor(value, device=sample.device, dtype=sample.dtype)
    if value.ndim == 0:
        value = value.expand(sample.shape[0])
    return value.reshape(-1, *([1] * (sample.ndim - 1)))


def _timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(timestep, device="cpu").long()
    if t.ndim == 0:
        t = t.expand(sample.shape[0])
    if t.shape != (sample.shape[0],):
        raise ValueError(f"timestep must be a scalar or shape ({sample.shape[0]},), got {tuple(t.shape)}")
    return t


def _predictions(scheduler, model_output, sample, alpha_t):
    """x0 and eps predictions as the scheduler computes them (before clipping)."""
    kind = scheduler.config.prediction_type
    beta_t = 1 - alpha_t
    if kind == "epsilon":
        return (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt(), model_output
    if kind == "sample":
        return model_output, (sample - alpha_t.sqrt() * model_output) / beta_t.sqrt()
    if kind == "v_prediction":
        return alpha_t.sqrt() * sample - beta_t.sqrt() * model_output, alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    raise ValueError(f"unsupported prediction_type {kind!r}: use 'epsilon', 'sample' or 'v_prediction'")


def _clip(scheduler, x0):
    if getattr(scheduler.config, "thresholding", False):
        return scheduler._threshold_sample(x0)
    if getattr(scheduler.config, "clip_sample", False):
        r = scheduler.config.clip_sample_range
        return x0.clamp(-r, r)
    return x0


def _ddim_prev_timestep(scheduler, t: torch.Tensor) -> torch.Tensor:
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alphas(scheduler, t, prev_t, sample):
    ac = scheduler.alphas_cumprod.to(sample.device)
    alpha_t = ac[t.to(sample.device)]
    final = torch.as_tensor(
        scheduler.final_alpha_cumprod if hasattr(scheduler, "final_alpha_cumprod") else 1.0,
        device=sample.device,
        dtype=ac.dtype,
    )
    prev = prev_t.to(sample.device)
    alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_mean_std(scheduler, model_output, timestep, sample, eta):
    """Mean and std of DDIM's x_{t-1} | x_t (DDIM paper Eqs. 12 and 16), plus x0/eps predictions."""
    t = _timesteps(timestep, sample)
    alpha_t, alpha_prev = _alphas(scheduler, t, _ddim_prev_timestep(scheduler, t), sample)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    a_t, a_prev, std = (_per_sample(v.to(sample.dtype), sample) for v in (alpha_t, alpha_prev, std))
    x0, eps = _predictions(scheduler, model_output, sample, a_t)
    x0 = _clip(scheduler, x0)
    # diffusers re-derives eps from the clipped x0 only with use_clipped_model_output=True (not used here).
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std, x0, eps


def ddpm_mean_std(scheduler, model_output, timestep, sample):
    """Mean and std of DDPM's posterior q(x_{t-1} | x_t, x0_pred) (DDPM paper Eqs. 6-7)."""
    if scheduler.config.variance_type not in ("fixed_small", "fixed_small_log"):
        raise ValueError(
            f"DDPMScheduler variance_type {scheduler.config.variance_type!r} is not supported for log-probs: "
            "use 'fixed_small' or 'fixed_small_log'"
        )
    t = _timesteps(timestep, sample)
    prev_t = torch.stack([torch.as_tensor(scheduler.previous_timestep(int(s))) for s in t]).long()
    alpha_t, alpha_prev = _alphas(scheduler, t, prev_t, sample)
    beta_t = 1 - alpha_t / alpha_prev
    variance = ((1 - alpha_prev) / (1 - alpha_t) * beta_t).clamp(min=1e-20)
    std = torch.where(t > 0, variance.sqrt(), torch.zeros_like(variance))
    a_t, a_prev, b_t, std = (_per_sample(v.to(sample.dtype), sample) for v in (alpha_t, alpha_prev, beta_t, std))
    x0, eps = _predictions(scheduler, model_output, sample, a_t)
    x0 = _clip(scheduler, x0)
    mean = (a_prev.sqrt() * b_t / (1 - a_t)) * x0 + ((1 - b_t).sqrt() * (1 - a_prev) / (1 - a_t)) * sample
    return mean, std, x0, eps


def set_timesteps(scheduler, num_steps: int, device=None) -> None:
    """The inference schedule of `num_steps` steps: the scheduler's own, except for flow models, whose
    grid drops the scheduler's last micro-step (`diffalign.flow.set_timesteps`)."""
    if flow.is_flow(scheduler):
        flow.set_timesteps(scheduler, num_steps, device)
    else:
        scheduler.set_timesteps(num_steps, device=device)


def timesteps_ready(scheduler, num_steps: int) -> bool:
    """True when the scheduler holds the schedule `set_timesteps(scheduler, num_steps)` sets."""
    if flow.is_flow(scheduler):
        return flow.on_grid(scheduler, num_steps)
    return getattr(scheduler, "num_inference_steps", None) == num_steps


def deterministic_steps(scheduler, num_steps: int, eta: float) -> list:
    """The timesteps of the `num_steps` schedule whose step has std 0 at this `eta` (no log-probability)."""
    set_timesteps(scheduler, num_steps)
    x = torch.zeros(1, 1)
    out = []
    for t in scheduler.timesteps:
        try:
            std = step_with_logprob(scheduler, x, t, x, eta=eta, with_logprob=False).std
        except ValueError:  # e.g. DDPM with eta != 1: the step itself refuses, with its own message, later
            return []
        if float(std.max()) == 0.0:
            out.append(float(t) if flow.is_flow(scheduler) else int(t))
    return out


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """log N(x; mean, std^2) per sample: summed (exact) or averaged over non-batch elements."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"log-prob reduction must be one of {REDUCTIONS}, got {reduction!r}")
    std = std.expand_as(x) if std.shape != x.shape else std
    # x is detached: the log-prob is a function of the policy parameters (through mean), not of
    # the sample being scored. Gradients w.r.t. x_t still flow through `mean`.
    elem = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    dims = tuple(range(1, x.ndim))
    return elem.sum(dim=dims) if reduction == "sum" else elem.mean(dim=dims)


def _is_ddpm(scheduler) -> bool:
    from diffusers import DDPMScheduler

    return isinstance(scheduler, DDPMScheduler)


def step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    *,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_noise: torch.Tensor | None = None,
    reduction: str = "sum",
    with_logprob: bool = True,
    sde: str = "flow-grpo",
) -> StepOutput:
    """One reverse step x_t -> x_{t-1} with the Gaussian log-probability of x_{t-1}.

    - `prev_sample` given: it is scored, not sampled (re-scoring a stored step).
    - otherwise x_{t-1} = mean + std * noise, with `variance_noise` if given, else drawn
      from `generator` in the same way the scheduler's own `step` draws it.
    - `timestep` may be an int or a (B,) tensor (one timestep per sample).
    - For `DDPMScheduler` the variance is the scheduler's own (`eta` must be 1, the
      DDPM value); its last step (t = 0) is deterministic and has no likelihood.

    - For `FlowMatchEulerDiscreteScheduler` the step is the SDE of `diffalign.flow` with
      noise level `eta` and noise schedule `sde` ('flow-grpo' or 'dance'), computed in fp32;
      eta = 0 is the scheduler's own ODE step.

    eta = 0 (deterministic DDIM, the flow ODE) has no likelihood and is refused when
    `with_logprob` is True.
    """
    if with_logprob and eta == 0:
        raise ValueError(
            "eta = 0 makes the step deterministic (std 0), so it has no log-probability: "
            "use eta > 0 (eta = 1 is DDPM's variance) for a likelihood-based method"
        )
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
    if model_output.dtype != sample.dtype:  # fp16/bf16 model output under autocast: the step is in the sample's dtype (fp32)
        model_output = model_output.to(sample.dtype)
    if flow.is_flow(scheduler):
        s, s_next, cap = flow.schedule_sigmas(scheduler, timestep, sample)
        x, v = sample.float(), model_output.float()
        mean, std = flow.sde_mean_std(v, x, s, s_next, flow.noise_level(sde, eta, s, cap))
        x0, eps = (p.to(sample.dtype) for p in flow.predictions(v, x, s))
    elif _is_ddpm(scheduler):
        if eta != 1.0:
            raise ValueError("DDPMScheduler has a fixed variance (eta = 1); use DDIMScheduler to choose eta")
        mean, std, x0, eps = ddpm_mean_std(scheduler, model_output, timestep, sample)
    else:
        mean, std, x0, eps = ddim_mean_std(scheduler, model_output, timestep, sample, eta)

    if prev_sample is None:
        if variance_noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = (mean + std * variance_noise).to(sample.dtype)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")

    log_prob = None
    if with_logprob:
        if bool((std == 0).any()):
            raise ValueError(
                f"the step at timestep {timestep} is deterministic (std 0) and has no log-probability: "
                "for DDIM use eta > 0, set_alpha_to_one=False and steps_offset=1 (so the last step is t=1, not t=0); "
                "DDPM's final step t=0 cannot be trained"
            )
        log_prob = gaussian_log_prob(prev_sample.to(mean.dtype), mean, std, reduction)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, x0_pred=x0, eps_pred=eps)


def alpha_bar(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """a_bar_t per sample, shaped (B, 1, ...) against `sample`; for a flow model the
    variance-preserving equivalent (1 − σ)² / ((1 − σ)² + σ²) of x_σ = (1 − σ)·x0 + σ·ε."""
    if flow.is_flow(scheduler):
        s = flow.sigma(scheduler, timestep, sample)
        return ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).to(sample.dtype)
    t = _timesteps(timestep, sample)
    return _per_sample(scheduler.alphas_cumprod.to(sample.device)[t.to(sample.device)].to(sample.dtype), sample)


def x0_from_output(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """Tweedie / DDIM prediction x0_hat from the raw model output, read by the scheduler's
    `prediction_type` (for 'epsilon': (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t)). Not clipped:
    the estimate itself, differentiable in x_t everywhere. Flow models: x_t − σ·v."""
    if flow.is_flow(scheduler):
        return flow.predictions(model_output, sample, flow.sigma(scheduler, timestep, sample).to(sample.dtype))[0]
    return _predictions(scheduler, model_output, sample, alpha_bar(scheduler, timestep, sample))[0]


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """What the denoiser is trained to output at x_t = add_noise(x0, noise, t): the noise for
    'epsilon', the velocity sqrt(a_bar) noise - sqrt(1 - a_bar) x0 for 'v_prediction', x0 for 'sample';
    for a flow model (x_t = (1 − σ)·x0 + σ·noise) the velocity noise − x0."""
    if flow.is_flow(scheduler):
        return noise - x0
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, _timesteps(timestep, x0).to(x0.device))
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}: use 'epsilon', 'sample' or 'v_prediction'")


def output_shift(scheduler, d_eps: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """The change of the raw model output that changes the implied noise by `d_eps` at fixed x_t.

    From x0 = (x_t - sqrt(1 - a) eps) / sqrt(a): 'epsilon' d_eps, 'v_prediction' d_eps / sqrt(a)
    (v = eps / sqrt(a) - sqrt(1 - a) x_t / sqrt(a)), 'sample' -sqrt(1 - a) d_eps / sqrt(a).

    Flow models (ε = x_t + (1 − σ)·v): d_eps / (1 − σ) for σ < 1, and 0 at σ = 1, where x_t is the
    noise itself, ε_hat = x_t whatever v is, and the score −x_t is the same for every tilt of the
    data (h_1(x) = E[h(X_0) | X_1 = x] does not depend on x, so an exact correction is 0 there and an
    estimated one is estimator noise; dividing by 1 − σ would multiply it without bound)."""
    if flow.is_flow(scheduler):
        s = flow.sigma(scheduler, timestep, sample)
        inside = s < 1
        return torch.where(inside, d_eps.float() / torch.where(inside, 1 - s, torch.ones_like(s)),
                           torch.zeros_like(s)).to(sample.dtype)
    kind = scheduler.config.prediction_type
    a = alpha_bar(scheduler, timestep, sample)
    if kind == "epsilon":
        return d_eps
    if kind == "v_prediction":
        return d_eps / a.sqrt()
    if kind == "sample":
        return -(1 - a).sqrt() * d_eps / a.sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r}: use 'epsilon', 'sample' or 'v_prediction'")


def noise_coefficient(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """s_t in x_t = a_t·x0 + s_t·ε, per sample (B, 1, ...): sqrt(1 − a_bar_t), or σ for a flow
    model; the score of p_t is −ε / s_t."""
    if flow.is_flow(scheduler):
        return flow.sigma(scheduler, timestep, sample).to(sample.dtype)
    return (1 - alpha_bar(scheduler, timestep, sample)).sqrt()


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """x_t from x0 and noise at `timestep` (a scalar or (B,)): the scheduler's `add_noise`, or
    (1 − σ)·x0 + σ·noise for a flow model (any σ = timestep / num_train_timesteps)."""
    if flow.is_flow(scheduler):
        s = flow.sigma(scheduler, timestep, x0).to(x0.dtype)
        return (1 - s) * x0 + s * noise
    return scheduler.add_noise(x0, noise, _timesteps(timestep, x0).to(x0.device))
