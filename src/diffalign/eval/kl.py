"""KL to the reference model along sampled trajectories.

For the same x_t, the policy's and the reference's steps are Gaussians N(mu_theta, s_p²)
and N(mu_ref, s_q²) (the same std when both samplers share eta), so the per-step KL is
sum over elements of log(s_q/s_p) + (s_p² + (mu_theta − mu_ref)²)/(2 s_q²) − 1/2, which is
||mu_theta − mu_ref||² / (2 s²) for equal stds. Summed over the steps of a trajectory
sampled from the policy, it is KL(policy path || reference path) for that sample's path,
and its mean over samples estimates the KL between the two path distributions, which
bounds the KL between the final-sample distributions from above.

The policy is (model, sampler): a method's sampler (e.g. with a score correction) is
measured as it samples; the reference is the model inside `reference()` with the plain
sampler.
"""

from __future__ import annotations

import torch

from .metrics import gaussian_step_kl


@torch.no_grad()
def path_kl(model, sampler, reference, ref_sampler, prompts, generators, batch_size: int = 128) -> torch.Tensor:
    """Per-sample path KL (nats) of `model` sampled by `sampler` to the model inside the
    `reference()` context sampled by `ref_sampler`.

    `reference` is a context manager factory under which `model` computes the reference
    (e.g. `Run.reference` or `adapters.adapters_disabled`)."""
    if sampler.eta <= 0 or ref_sampler.eta <= 0:
        raise ValueError("path KL needs stochastic steps (eta > 0): with eta = 0 both paths are deterministic")
    out = []
    for i0 in range(0, len(prompts), batch_size):
        ps, gens = prompts[i0:i0 + batch_size], generators[i0:i0 + batch_size]
        traj = sampler.sample(model, ps, generator=gens, with_logprob=False)
        kl = torch.zeros(len(ps), dtype=torch.float64, device=traj.latents.device)
        for i, t in enumerate(traj.timesteps):
            x_t, x_prev = traj.latents[:, i], traj.latents[:, i + 1]
            p = sampler.step(model, x_t, t, traj.cond, prev_sample=x_prev, with_logprob=False,
                             output=traj.outputs[:, i])
            with reference():
                q = ref_sampler.step(model, x_t, t, traj.cond, prev_sample=x_prev, with_logprob=False)
            same = torch.equal(torch.as_tensor(p.std), torch.as_tensor(q.std))
            kl += gaussian_step_kl(p.mean, q.mean, p.std, None if same else q.std)
        out.append(kl.cpu())
    return torch.cat(out)
