"""Scheduler families: one class per family of diffusers schedulers, holding that family's formulas.

A family (`Family`) answers, for its schedulers, everything `diffalign.sampling` asks:

- `mean_std`: the Gaussian of one reverse step x_t -> x_{t-1} (mean, std, and the x0 and noise
  predictions the step uses);
- `alpha_bar`, `noise_coefficient`, `add_noise`: the forward process x_t = a_t·x0 + s_t·ε;
- `x0_from_output`, `training_target`, `output_shift`: how the model output reads;
- `set_timesteps`, `timesteps_ready`: the inference schedule.

`family_of(scheduler)` finds the family of a scheduler among the registered ones; a new family
is one class decorated with `@register`. Here: `DDIM` and `DDPM` (variance-preserving, the output
read by the scheduler's `prediction_type`: `PREDICTIONS`); the flow-matching SDE is
`diffalign.flow.FlowSDE`, registered when `diffalign.flow` is imported (`diffalign.sampling` does).
"""

from __future__ import annotations

import torch

FAMILIES: list[type["Family"]] = []


def register(cls: type["Family"]) -> type["Family"]:
    """Class decorator: make `family_of` find `cls` for the schedulers its `matches` accepts."""
    FAMILIES.append(cls)
    return cls


def family_of(scheduler) -> "Family":
    """The registered family of `scheduler`, bound to it."""
    for cls in FAMILIES:
        if cls.matches(scheduler):
            return cls(scheduler)
    known = ", ".join(cls.__name__ for cls in FAMILIES)
    raise ValueError(f"no step family for {type(scheduler).__name__} (known: {known}): "
                     "write one `diffalign.steps.Family` subclass with `@register`")


def per_sample(value, sample: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """A scalar or (B,) value (a timestep) -> a (B,) tensor for the B rows of `sample`, in `dtype` on
    `device` (default: the sample's)."""
    v = torch.as_tensor(value, device=sample.device if device is None else device)
    v = v.to(sample.dtype if dtype is None else dtype)
    if v.ndim == 0:
        v = v.expand(sample.shape[0])
    if v.shape != (sample.shape[0],):
        raise ValueError(f"timestep must be a scalar or shape ({sample.shape[0]},), got {tuple(v.shape)}")
    return v


def broadcastable(value: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor -> (B, 1, 1, ...), broadcastable against `sample`."""
    return value.reshape(-1, *([1] * (sample.ndim - 1)))


class Family:
    """The interface: one reverse step as a Gaussian, the forward process, and the output's reading."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @staticmethod
    def matches(scheduler) -> bool:
        """True for the schedulers of this family."""
        raise NotImplementedError

    def set_timesteps(self, num_steps: int, device=None) -> None:
        """Set the scheduler's inference schedule of `num_steps` steps."""
        raise NotImplementedError

    def timesteps_ready(self, num_steps: int) -> bool:
        """True when the scheduler holds the schedule `set_timesteps(num_steps)` sets."""
        raise NotImplementedError

    def mean_std(self, model_output, timestep, sample, eta: float, sde: str):
        """(mean, std, x0_pred, eps_pred) of x_{t-1} | x_t at noise level `eta` (`sde`: the flow SDE's
        noise schedule, unused elsewhere); std (B, 1, ...), the others shaped like `sample`."""
        raise NotImplementedError

    def alpha_bar(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """ā_t per sample, (B, 1, ...)."""
        raise NotImplementedError

    def x0_from_output(self, model_output, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The model's prediction of x0 at x_t (not clipped)."""
        raise NotImplementedError

    def training_target(self, x0, noise, timestep) -> torch.Tensor:
        """The output the model is trained to give at x_t = add_noise(x0, noise, t)."""
        raise NotImplementedError

    def output_shift(self, d_eps, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The change of the model output that changes the implied noise by `d_eps` at fixed x_t."""
        raise NotImplementedError

    def noise_coefficient(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """s_t of x_t = a_t·x0 + s_t·ε, per sample (B, 1, ...)."""
        raise NotImplementedError

    def add_noise(self, x0, noise, timestep) -> torch.Tensor:
        """x_t from x0 and noise at `timestep` (a scalar or (B,))."""
        raise NotImplementedError

    def random_timesteps(self, n: int, generator=None) -> torch.Tensor:
        """(n,) timesteps drawn over the whole training range, as `add_noise` takes them."""
        raise NotImplementedError


# ---- variance-preserving schedulers: x_t = sqrt(ā_t)·x0 + sqrt(1 − ā_t)·ε ------------------------------

class Epsilon:
    """The model outputs ε: x0 = (x_t − sqrt(1 − ā)·ε) / sqrt(ā)."""

    @staticmethod
    def split(output, sample, a):
        return (sample - (1 - a).sqrt() * output) / a.sqrt(), output

    @staticmethod
    def target(scheduler, x0, noise, timestep):
        return noise

    @staticmethod
    def shift(d_eps, a):
        return d_eps


class Sample:
    """The model outputs x0: ε = (x_t − sqrt(ā)·x0) / sqrt(1 − ā); a noise change d_eps is
    −sqrt(1 − ā)·d_eps / sqrt(ā)."""

    @staticmethod
    def split(output, sample, a):
        return output, (sample - a.sqrt() * output) / (1 - a).sqrt()

    @staticmethod
    def target(scheduler, x0, noise, timestep):
        return x0

    @staticmethod
    def shift(d_eps, a):
        return -(1 - a).sqrt() * d_eps / a.sqrt()


class VPrediction:
    """The model outputs v = sqrt(ā)·ε − sqrt(1 − ā)·x0: x0 = sqrt(ā)·x_t − sqrt(1 − ā)·v,
    ε = sqrt(ā)·v + sqrt(1 − ā)·x_t; a noise change d_eps is d_eps / sqrt(ā)."""

    @staticmethod
    def split(output, sample, a):
        b = 1 - a
        return a.sqrt() * sample - b.sqrt() * output, a.sqrt() * output + b.sqrt() * sample

    @staticmethod
    def target(scheduler, x0, noise, timestep):
        return scheduler.get_velocity(x0, noise, per_sample(timestep, x0, torch.long, "cpu").to(x0.device))

    @staticmethod
    def shift(d_eps, a):
        return d_eps / a.sqrt()


PREDICTIONS = {"epsilon": Epsilon, "sample": Sample, "v_prediction": VPrediction}


class VariancePreserving(Family):
    """What DDIM and DDPM share: ā_t = `alphas_cumprod[t]`, the scheduler's own schedule and `add_noise`,
    the output read by `prediction_type` (`PREDICTIONS`)."""

    @property
    def prediction(self):
        kind = self.scheduler.config.prediction_type
        if kind not in PREDICTIONS:
            raise ValueError(f"unsupported prediction_type {kind!r}: use 'epsilon', 'sample' or 'v_prediction'")
        return PREDICTIONS[kind]

    def set_timesteps(self, num_steps, device=None):
        self.scheduler.set_timesteps(num_steps, device=device)

    def timesteps_ready(self, num_steps):
        return getattr(self.scheduler, "num_inference_steps", None) == num_steps

    def alpha_bar(self, timestep, sample):
        t = per_sample(timestep, sample, torch.long, "cpu")
        return broadcastable(self.scheduler.alphas_cumprod.to(sample.device)[t.to(sample.device)].to(sample.dtype),
                             sample)

    def x0_from_output(self, model_output, timestep, sample):
        """Tweedie / DDIM: for 'epsilon' (x_t − sqrt(1 − ā_t)·ε) / sqrt(ā_t)."""
        return self.prediction.split(model_output, sample, self.alpha_bar(timestep, sample))[0]

    def training_target(self, x0, noise, timestep):
        """ε for 'epsilon', sqrt(ā)·ε − sqrt(1 − ā)·x0 for 'v_prediction', x0 for 'sample'."""
        return self.prediction.target(self.scheduler, x0, noise, timestep)

    def output_shift(self, d_eps, timestep, sample):
        a = self.alpha_bar(timestep, sample)
        return self.prediction.shift(d_eps, a)

    def noise_coefficient(self, timestep, sample):
        """sqrt(1 − ā_t)."""
        return (1 - self.alpha_bar(timestep, sample)).sqrt()

    def add_noise(self, x0, noise, timestep):
        return self.scheduler.add_noise(x0, noise, per_sample(timestep, x0, torch.long, "cpu").to(x0.device))

    def random_timesteps(self, n, generator=None):
        """Uniform over the integer timesteps 0 … T − 1 (DDPM training)."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def _alphas(self, t, prev_t, sample):
        """(ā_t, ā_prev), (B,): ā of the previous timestep, the scheduler's final ā where it is < 0."""
        ac = self.scheduler.alphas_cumprod.to(sample.device)
        alpha_t = ac[t.to(sample.device)]
        final = torch.as_tensor(getattr(self.scheduler, "final_alpha_cumprod", 1.0), device=sample.device,
                                dtype=ac.dtype)
        prev = prev_t.to(sample.device)
        return alpha_t, torch.where(prev >= 0, ac[prev.clamp(min=0)], final)

    def _x0_eps(self, model_output, sample, a_t):
        """x0 and ε predictions as the scheduler's `step` uses them: x0 clipped or thresholded as its
        config says (ε is not re-derived from the clipped x0: diffusers' use_clipped_model_output=False)."""
        x0, eps = self.prediction.split(model_output, sample, a_t)
        config = self.scheduler.config
        if getattr(config, "thresholding", False):
            return self.scheduler._threshold_sample(x0), eps
        if getattr(config, "clip_sample", False):
            return x0.clamp(-config.clip_sample_range, config.clip_sample_range), eps
        return x0, eps


@register
class DDIM(VariancePreserving):
    """diffusers' `DDIMScheduler` (DDIM paper Eqs. 12 and 16), t -> t − T/N:
    σ_t = η·sqrt((1 − ā_prev) / (1 − ā_t) · (1 − ā_t / ā_prev)),
    mean = sqrt(ā_prev)·x0 + sqrt(1 − ā_prev − σ_t²)·ε."""

    @staticmethod
    def matches(scheduler):
        from diffusers import DDIMScheduler

        return isinstance(scheduler, DDIMScheduler)

    def mean_std(self, model_output, timestep, sample, eta, sde="flow-grpo"):
        s = self.scheduler
        if s.num_inference_steps is None:
            raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
        t = per_sample(timestep, sample, torch.long, "cpu")
        alpha_t, alpha_prev = self._alphas(t, t - s.config.num_train_timesteps // s.num_inference_steps, sample)
        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        std = eta * variance.sqrt()
        a_t, a_prev, std = (broadcastable(v.to(sample.dtype), sample) for v in (alpha_t, alpha_prev, std))
        x0, eps = self._x0_eps(model_output, sample, a_t)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        return mean, std, x0, eps


@register
class DDPM(VariancePreserving):
    """diffusers' `DDPMScheduler` with a fixed small variance (DDPM paper Eqs. 6-7), eta = 1 only:
    β_t = 1 − ā_t / ā_prev, σ_t² = (1 − ā_prev) / (1 − ā_t)·β_t (0 at t = 0),
    mean = sqrt(ā_prev)·β_t / (1 − ā_t)·x0 + sqrt(1 − β_t)·(1 − ā_prev) / (1 − ā_t)·x_t."""

    @staticmethod
    def matches(scheduler):
        from diffusers import DDPMScheduler

        return isinstance(scheduler, DDPMScheduler)

    def mean_std(self, model_output, timestep, sample, eta, sde="flow-grpo"):
        s = self.scheduler
        if eta != 1.0:
            raise ValueError("DDPMScheduler has a fixed variance (eta = 1); use DDIMScheduler to choose eta")
        if s.config.variance_type not in ("fixed_small", "fixed_small_log"):
            raise ValueError(f"DDPMScheduler variance_type {s.config.variance_type!r} is not supported for "
                             "log-probs: use 'fixed_small' or 'fixed_small_log'")
        t = per_sample(timestep, sample, torch.long, "cpu")
        prev_t = torch.stack([torch.as_tensor(s.previous_timestep(int(v))) for v in t]).long()
        alpha_t, alpha_prev = self._alphas(t, prev_t, sample)
        beta_t = 1 - alpha_t / alpha_prev
        variance = ((1 - alpha_prev) / (1 - alpha_t) * beta_t).clamp(min=1e-20)
        std = torch.where(t > 0, variance.sqrt(), torch.zeros_like(variance))
        a_t, a_prev, b_t, std = (broadcastable(v.to(sample.dtype), sample) for v in (alpha_t, alpha_prev, beta_t, std))
        x0, eps = self._x0_eps(model_output, sample, a_t)
        mean = (a_prev.sqrt() * b_t / (1 - a_t)) * x0 + ((1 - b_t).sqrt() * (1 - a_prev) / (1 - a_t)) * sample
        return mean, std, x0, eps
