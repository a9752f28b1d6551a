"""KL to the reference model along sampled trajectories.

For the same x_t, policy and reference steps are Gaussians with the same std sigma_t
(the scheduler fixes it) and means mu_theta, mu_ref, so the per-step KL is
||mu_theta - mu_ref||^2 / (2 sigma_t^2). Summed over the steps of a trajectory sampled
from the policy, it is KL(policy path || reference path) for that sample's path, and its
mean over samples estimates the KL between the two path distributions, which bounds the
KL between the final-sample distributions from above.
"""

from __future__ import annotations

import torch

from .. import trajectory
from ..sampling import step_with_logprob
from .metrics import gaussian_step_kl


@torch.no_grad()
def path_kl(model, reference, prompts, generators, *, num_steps: int, eta: float, guidance_scale: float,
            batch_size: int = 128) -> torch.Tensor:
    """Per-sample path KL (nats) of `model` to the model inside the `reference()` context.

    `reference` is a context manager factory under which `model` computes the reference
    (e.g. `Trainer.reference` or `adapters.adapters_disabled`)."""
    if eta <= 0:
        raise ValueError("path KL needs stochastic steps (eta > 0): with eta = 0 both paths are deterministic")
    out = []
    s = model.scheduler
    for i0 in range(0, len(prompts), batch_size):
        ps, gens = prompts[i0:i0 + batch_size], generators[i0:i0 + batch_size]
        traj = trajectory.sample(model, ps, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
                                 generator=gens, with_logprob=False)
        kl = torch.zeros(len(ps), dtype=torch.float64, device=traj.latents.device)
        with reference():
            for i, t in enumerate(traj.timesteps):
                x_t = traj.latents[:, i]
                ref_eps = trajectory.predict_eps(model, x_t, t, traj.cond, guidance_scale)
                p = step_with_logprob(s, traj.eps[:, i], t, x_t, eta=eta, prev_sample=traj.latents[:, i + 1],
                                      with_logprob=False)
                q = step_with_logprob(s, ref_eps, t, x_t, eta=eta, prev_sample=traj.latents[:, i + 1],
                                      with_logprob=False)
                kl += gaussian_step_kl(p.mean, q.mean, p.std)
        out.append(kl.cpu())
    return torch.cat(out)
