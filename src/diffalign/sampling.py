"""One denoising step as a Gaussian policy: the previous sample, its log-probability,
and the step's mean and std, for diffusers' `DDIMScheduler` and `DDPMScheduler`, and for
`FlowMatchEulerDiscreteScheduler` through the SDE of `diffalign.flow`.

Every function here hands the work to the scheduler's family (`diffalign.steps.family_of`: DDIM,
DDPM, or the flow SDE `diffalign.flow.FlowSDE`), which holds that family's formulas: for flow models
the output is a velocity, `eta` is the SDE's noise level and `alpha_bar` the variance-preserving
equivalent (1 − σ)² / ((1 − σ)² + σ²). A new scheduler family is one new `steps.Family` class.

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

from . import flow  # noqa: F401  (registers the flow family)
from .steps import family_of

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


def set_timesteps(scheduler, num_steps: int, device=None) -> None:
    """The inference schedule of `num_steps` steps: the scheduler's own, except for flow models, whose
    grid drops the scheduler's last micro-step (`diffalign.flow.set_timesteps`)."""
    family_of(scheduler).set_timesteps(num_steps, device)


def timesteps_ready(scheduler, num_steps: int) -> bool:
    """True when the scheduler holds the schedule `set_timesteps(scheduler, num_steps)` sets."""
    return family_of(scheduler).timesteps_ready(num_steps)


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
            out.append(t.item())  # an int (DDIM, DDPM) or a float (flow), as the schedule holds it
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
    mean, std, x0, eps = family_of(scheduler).mean_std(model_output, timestep, sample, eta, sde)
    if prev_sample is None:
        prev_sample = _draw(mean, std, sample, generator, variance_noise)
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


def _draw(mean, std, sample, generator, variance_noise) -> torch.Tensor:
    """mean + std·noise in the sample's dtype; the noise drawn as the scheduler's own `step` draws it
    unless given."""
    if variance_noise is None:
        from diffusers.utils.torch_utils import randn_tensor

        variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    return (mean + std * variance_noise).to(sample.dtype)


def alpha_bar(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """a_bar_t per sample, shaped (B, 1, ...) against `sample`; for a flow model the
    variance-preserving equivalent (1 − σ)² / ((1 − σ)² + σ²) of x_σ = (1 − σ)·x0 + σ·ε."""
    return family_of(scheduler).alpha_bar(timestep, sample)


def x0_from_output(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """Tweedie / DDIM prediction x0_hat from the raw model output, read by the scheduler's
    `prediction_type` (for 'epsilon': (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t)). Not clipped:
    the estimate itself, differentiable in x_t everywhere. Flow models: x_t − σ·v."""
    return family_of(scheduler).x0_from_output(model_output, timestep, sample)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """What the denoiser is trained to output at x_t = add_noise(x0, noise, t): the noise for
    'epsilon', the velocity sqrt(a_bar) noise - sqrt(1 - a_bar) x0 for 'v_prediction', x0 for 'sample';
    for a flow model (x_t = (1 − σ)·x0 + σ·noise) the velocity noise − x0."""
    return family_of(scheduler).training_target(x0, noise, timestep)


def output_shift(scheduler, d_eps: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """The change of the raw model output that changes the implied noise by `d_eps` at fixed x_t.

    From x0 = (x_t - sqrt(1 - a) eps) / sqrt(a): 'epsilon' d_eps, 'v_prediction' d_eps / sqrt(a)
    (v = eps / sqrt(a) - sqrt(1 - a) x_t / sqrt(a)), 'sample' -sqrt(1 - a) d_eps / sqrt(a).
    Flow models (ε = x_t + (1 − σ)·v): d_eps / (1 − σ) for σ < 1, and 0 at σ = 1
    (`flow.FlowSDE.output_shift` says why)."""
    return family_of(scheduler).output_shift(d_eps, timestep, sample)


def noise_coefficient(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """s_t in x_t = a_t·x0 + s_t·ε, per sample (B, 1, ...): sqrt(1 − a_bar_t), or σ for a flow
    model; the score of p_t is −ε / s_t."""
    return family_of(scheduler).noise_coefficient(timestep, sample)


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """x_t from x0 and noise at `timestep` (a scalar or (B,)): the scheduler's `add_noise`, or
    (1 − σ)·x0 + σ·noise for a flow model (any σ = timestep / num_train_timesteps)."""
    return family_of(scheduler).add_noise(x0, noise, timestep)


def random_timesteps(scheduler, n: int, generator=None) -> torch.Tensor:
    """(n,) timesteps over the whole training range (CPU), as `add_noise` takes them: uniform integers for
    DDIM/DDPM; for a flow model σ·T with σ = the shift's warp of U(0, 1)."""
    return family_of(scheduler).random_timesteps(n, generator)
