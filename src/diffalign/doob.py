"""Sampling q(x_0) ∝ exp(−f(x_0))·p_ref(x_0) with the reference model and a Doob h-transform.

The reference's marginals p_t tilted by h_t(x) = E_ref[exp(−f(X_0)) | X_t = x] are the
marginals of q, and q's score is ∇ log p_t + ∇ log h_t. Every correction here is a
`Sampler.correction` returning Δ = ∇_x log h_t(x_t), which the sampler adds to the score.

How Δ is computed (all three): by Tweedie's formula for the VP process
x_t = √ā x_0 + √(1−ā) ε, the score of p_t is (√ā·E_p[X_0|x_t] − x_t)/(1−ā), and the same
for q with the tilted posterior q(x_0|x_t) ∝ p_ref(x_0|x_t)·exp(−f(x_0)). So

    Δ = ∇ log h_t(x_t) = √ā/(1−ā) · (E_q[X_0 | x_t] − E_p[X_0 | x_t]),

a difference of posterior means; no gradient of f or of the denoiser is needed.

Estimators (`DoobCorrection(estimator=...)`):

- `continuation` (default): M reference continuations from x_t down to x_0 in K evenly
  spaced DDPM jumps (DDIM with eta = 1; K = 20 by default, whatever t is) are M draws
  from p_ref(x_0 | x_t); self-normalised importance
  weights w_m ∝ exp(−f(x_0^m)) turn them into the tilted posterior, and
  Δ = √ā/(1−ā)·(Σ w_m x_0^m − mean_m x_0^m). Using the particles' own mean (not the
  denoiser's x0_hat) as E_p is a control variate: Δ is exactly 0 when f is constant.
  Bias: self-normalised importance sampling is biased by O(1/M) (and noisy when the
  weights are uneven: the effective sample size is logged); the continuation's K-step
  discretisation and the model's own error make the particles only approximately
  posterior draws. Each DDPM step draws from q(x_s | x_t, x0_hat), ignoring x0's own
  uncertainty, so coarse continuations under-disperse and shrink Δ: on Gaussian data
  with an exact denoiser, 20 steps gave 0.70 of the exact Δ at t = 801, 500 steps 0.92 at
  t = 101 (tests/test_ddo.py); the error falls like 1/steps. On toy2d with the exact
  potential (n = 500, M = 32; distance to p* over its floor, 4 noise seeds) the
  sampler's own remaining steps gave 2.1-2.9, K = 20 1.1-2.2, K = 50 0.9-2.0.
  Cost per sampler step: M·K denoiser calls per sample, so M·K·T over a T-step
  sample, and M potential evaluations per step. This is the expensive, accurate option.
- `gaussian`: the posterior approximated by N(x0_hat, v_t·I), with the exact posterior
  variance for a N(·, s²I) prior, v_t = s²(1−ā)/(ā s² + 1−ā) (s² = `data_var`). M draws
  from it, weighted as above. Cost: no extra denoiser call, M potential evaluations.
  Bias: the posterior is neither Gaussian nor isotropic (multimodal at high noise for a
  mixture), so the tilt is only right where the noise is small; exact for Gaussian data.
- `learned` (fast, amortised): a network c_φ(x_t, t) trained so that Δ = c_φ, by the
  weighted regression of `learned_correction_loss` on reference samples (its minimiser
  is the tilted posterior mean above). Cost: one call of a small network per step.
  Bias: whatever the regression did not fit; importance weights over reference samples
  degrade when q is far from p_ref, so it needs many of them: on the toy2d bench (DDO,
  β = 1, 3 seeds) 32,768 reference samples and 500 steps of 256 per iteration land at
  1.45× the floor of the distance to p* in 51 s, the continuation estimator (M = 32,
  K = 20) at 1.24× in 119 s; 8,192 samples gave 1.6-2.6× (docs/results/ddo.md).

The corrections are deterministic functions of their inputs (particle noise is seeded
from x_t), so a sample and its re-scoring see the same Δ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import alpha_bar, x0_from_output

ESTIMATORS = ("continuation", "gaussian", "learned")


def tilted_shift(scheduler, t, x_t: torch.Tensor, x0s: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Δ = √ā/(1−ā)·(Σ_m w_m x0_m − mean_m x0_m), w = softmax(log_w) over particles.

    x0s (B, M, *shape), log_w (B, M); returns (B, *shape)."""
    w = torch.softmax(log_w.double(), dim=1).to(x0s.dtype)
    extra = (1,) * (x0s.ndim - 2)
    diff = (w.view(*w.shape, *extra) * x0s).sum(1) - x0s.mean(1)
    a = alpha_bar(scheduler, t, x_t)
    return a.sqrt() / (1 - a) * diff


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(Σw)²/Σw² per row of log-weights (B, M): M for even weights, 1 for one dominant particle."""
    w = torch.softmax(log_w.double(), dim=1)
    return 1.0 / (w**2).sum(1)


def _generator(x: torch.Tensor, t, salt: int) -> torch.Generator:
    """A generator seeded from x_t itself, so the same x_t gets the same particles."""
    key = int((x.double().flatten()[:4096].abs().sum().item() * 1e6) % (2**31)) ^ (int(t) * 7919) ^ salt
    return torch.Generator(device=x.device).manual_seed(key)


def _alphas(scheduler, t: int, device) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)[int(t)]


def last_timestep(scheduler) -> int | None:
    ts = getattr(scheduler, "timesteps", None)
    return None if ts is None or len(ts) == 0 else int(ts[-1])


def continuation_schedule(t: int, last: int, steps: int) -> list[int]:
    """K + 1 timesteps from t down to `last` (the sampler's final timestep), evenly spaced, distinct."""
    pts = torch.linspace(float(t), float(last), steps + 1).round().long().tolist()
    return sorted(set(pts), reverse=True)


@dataclass
class DoobCorrection:
    """A `Sampler.correction`: Δ = ∇_x log E_ref[exp(−f(X_0)) | X_t = x] (see the module docstring).

    `potential(x0, cond) -> (B,)` is f; `predict(model, x, t, cond)` is the reference's
    model output (the plain sampler's `predict`, with its guidance)."""

    potential: Callable
    predict: Callable
    estimator: str = "continuation"
    particles: int = 16
    steps: int = 20  # continuation: DDPM jumps from t to the end (evenly spaced); 0 = the sampler's remaining steps
    data_var: float = 1.0  # gaussian: prior variance s² per element
    net: Callable | None = None  # learned: c_φ(x, t, cond) -> Δ
    chunk: int = 8192  # rows per denoiser call
    uses_output = True  # the sampler passes its own (uncorrected) model output at x_t
    ess: list = field(default_factory=list)  # mean effective sample size of each call since `reset_stats`

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown Doob estimator {self.estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if self.estimator == "learned" and self.net is None:
            raise ValueError("the 'learned' Doob correction needs its network (net=)")
        if self.particles < 2 and self.estimator != "learned":
            raise ValueError(f"particles must be >= 2 for a Monte Carlo Doob correction, got {self.particles}")

    def __call__(self, model, x, t, cond, output=None):
        tt = torch.as_tensor(t, device=x.device).reshape(-1)
        if self.estimator == "learned":
            return model.forward(self.net, x, tt.expand(x.shape[0]), cond)
        if tt.numel() > 1 and bool((tt != tt[0]).any()):  # one timestep per row (re-scoring): each group on its own
            delta = torch.empty_like(x)
            for value in tt.unique():
                rows = (tt == value).nonzero().squeeze(1)
                delta[rows] = self(model, x[rows], int(value), None if cond is None else cond[rows],
                                   None if output is None else output[rows])
            return delta
        t_int = int(tt[0])
        if output is None:
            output = self.predict(model, x, t_int, cond)
        x0s = self._continue(model, x, t_int, cond, output) if self.estimator == "continuation" else \
            self._gaussian(model, x, t_int, output)
        B, M = x0s.shape[:2]
        flat_cond = None if cond is None else cond.repeat_interleave(M, 0)
        log_w = -self.potential(x0s.flatten(0, 1), flat_cond).view(B, M).double()
        if not torch.isfinite(log_w).all():
            raise FloatingPointError("the DDO potential returned NaN/inf at the Doob particles: the potential "
                                     "network diverged (lower optim.lr, or check the objective's targets)")
        if t_int != last_timestep(model.scheduler):  # at the last step every particle is the same x0_hat
            self.ess.append(float(effective_sample_size(log_w).mean()))
        return tilted_shift(model.scheduler, t_int, x, x0s, log_w)

    @property
    def stats(self) -> dict:
        """Mean effective sample size of the particles (per sample, over steps and calls), and
        its fraction of `particles`: low values mean a noisy, biased correction."""
        if not self.ess:
            return {}
        m = sum(self.ess) / len(self.ess)
        return {"doob_ess": m, "doob_ess_fraction": m / self.particles}

    def reset_stats(self) -> None:
        self.ess = []

    def _gaussian(self, model, x, t: int, output) -> torch.Tensor:
        a = _alphas(model.scheduler, t, x.device)
        s2 = self.data_var
        v = (s2 * (1 - a) / (a * s2 + 1 - a)).to(x.dtype)
        x0 = x0_from_output(model.scheduler, output, t, x)
        z = torch.randn((x.shape[0], self.particles, *x.shape[1:]), generator=_generator(x, t, 1), device=x.device,
                        dtype=x.dtype)
        return x0.unsqueeze(1) + v.sqrt() * z

    def _continue(self, model, x, t: int, cond, output) -> torch.Tensor:
        """(B, M, *shape) draws of X_0 from M DDIM (eta = 1) continuations of x_t."""
        sch = model.scheduler
        later = [int(s) for s in sch.timesteps if int(s) < t]  # the sampler's own remaining timesteps
        times = [t] + later if self.steps <= 0 or not later else continuation_schedule(t, later[-1], self.steps)
        B, M = x.shape[0], self.particles
        gen = _generator(x, t, 2)
        xs = x.repeat_interleave(M, 0)
        flat_cond = None if cond is None else cond.repeat_interleave(M, 0)
        out = output.repeat_interleave(M, 0)
        for i, s in enumerate(times[1:]):
            cur = times[i]
            if i > 0:
                out = self._predict_chunked(model, xs, cur, flat_cond)
            a_t, a_s = _alphas(sch, cur, x.device), _alphas(sch, s, x.device)
            x0 = x0_from_output(sch, out, cur, xs)
            eps = (xs - a_t.sqrt().to(xs.dtype) * x0) / (1 - a_t).sqrt().to(xs.dtype)
            var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            mean = a_s.sqrt() * x0 + (1 - a_s - var).clamp(min=0).sqrt() * eps
            xs = mean.to(xs.dtype) + var.sqrt().to(xs.dtype) * torch.randn(xs.shape, generator=gen, device=xs.device,
                                                                           dtype=xs.dtype)
        end = times[-1]
        out = output.repeat_interleave(M, 0) if len(times) == 1 else self._predict_chunked(model, xs, end, flat_cond)
        x0 = x0_from_output(sch, out, end, xs)
        return x0.view(B, M, *x.shape[1:])

    def _predict_chunked(self, model, xs, t: int, cond):
        outs = []
        for i in range(0, xs.shape[0], self.chunk):
            c = None if cond is None else cond[i:i + self.chunk]
            outs.append(self.predict(model, xs[i:i + self.chunk], t, c))
        return torch.cat(outs)


def learned_correction_loss(model, net, x0: torch.Tensor, cond, weights: torch.Tensor, timesteps: torch.Tensor,
                            generator: torch.Generator | None = None, predict: Callable | None = None) -> torch.Tensor:
    """Weighted regression whose minimiser is the Doob correction Δ.

    x0 (N, *shape) are reference samples, `weights` (N,) ∝ exp(−f(x0)) normalised to mean 1
    over the whole reference pool (so the weighted loss is an expectation under q). For a
    timestep t drawn from `timesteps` and x_t = √ā x0 + √(1−ā) ε:
        loss = mean w·(1−ā)·||c_φ(x_t, t) − √ā/(1−ā)·(x0 − x0_hat_ref(x_t))||².
    Per x_t its minimiser is √ā/(1−ā)·(E_q[X0|x_t] − x0_hat), which is Δ when the
    reference's x0_hat is E_p[X0|x_t]; the (1−ā) weight keeps small-noise targets from
    dominating. x0_hat comes from `predict(model, x, t, cond)`, the model output the sampler
    adds the correction to (the plain sampler's `predict`, with its guidance); None = the
    unguided denoiser."""
    n = x0.shape[0]
    device = x0.device
    t = timesteps.to(device)[torch.randint(len(timesteps), (n,), generator=generator).to(device)]
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
    x_t = model.scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        out = model.predict_noise(x_t, t, cond) if predict is None else predict(model, x_t, t, cond)
        x0_hat = x0_from_output(model.scheduler, out, t, x_t)
    a = alpha_bar(model.scheduler, t, x_t)
    target = a.sqrt() / (1 - a) * (x0 - x0_hat)
    err = (model.forward(net, x_t, t, cond) - target).pow(2).flatten(1).sum(1) * (1 - a).flatten()
    return (weights.to(err.dtype) * err).mean()
