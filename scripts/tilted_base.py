"""How near p* can a method get whose optimum is the base sampler's own distribution tilted by exp(r/β)?

    python scripts/tilted_base.py toy2d-flow      # or toy2d; --steps 20 --pool 100000
    python scripts/tilted_base.py --modes RUN...  # a trained run's mass per mode of p*, against p*'s

For each sampler noise level (eta 0 = the ODE; 1; and √2 = the memoryless SDE on flow models), draws a pool
of base samples, resamples 1,000 of them with weights exp(r/β) (sampling-importance-resampling: the pool's
effective size is printed) and reports their distance to the exact p* as a ratio to the floor, with the
toy2d benches' yardstick, over four resamplings. Adjoint Matching's optimum is the memoryless chain's
tilt, so its row is the best that method can reach on this grid.
"""

from __future__ import annotations

import argparse
import math

import torch

from diffalign.models import load_model
from diffalign.models.toy2d import distance_to_data, distance_to_optimum
from diffalign.rewards.toy2d import quadratic
from diffalign.sampler import Sampler


def modes(runs, beta: float, n: int = 4000):
    """Each run's final model, n samples on its evaluation sampler: the share nearest (by p*'s posterior)
    each of p*'s six components, and each component's mean variance, against p*'s."""
    from diffalign.eval import load_run
    from diffalign.eval.core import sample_eval
    from diffalign.models.toy2d import tilted_mixture

    w, m, P = tilted_mixture(beta)
    comps = torch.distributions.MultivariateNormal(m, covariance_matrix=P)
    print("p*:", " ".join(f"{v:.3f}" for v in w.tolist()), "| variance", " ".join(f"{float(c.diag().mean()):.3f}" for c in P))
    for run in runs:
        lr = load_run(run)
        with torch.no_grad():
            x = sample_eval(lr.run.model, lr.sampler, [""], n, 99)[0].double()
        k = (comps.log_prob(x.unsqueeze(1)) + w.log()).argmax(1)
        share = torch.bincount(k, minlength=len(w)).double() / len(x)
        var = [float(x[k == j].var(0).mean()) if (k == j).sum() > 2 else float("nan") for j in range(len(w))]
        print(f"{run}:", " ".join(f"{v:.3f}" for v in share.tolist()), "| variance", " ".join(f"{v:.3f}" for v in var))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", choices=["toy2d", "toy2d-flow"])
    p.add_argument("--modes", nargs="+", metavar="RUN", help="trained runs' mass per mode of p* instead")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pool", type=int, default=100_000)
    p.add_argument("--beta", type=float, default=1.0)
    a = p.parse_args()
    if a.modes:
        return modes(a.modes, a.beta)
    if a.model is None:
        p.error("name a model (toy2d or toy2d-flow) or --modes RUN...")
    model = load_model(a.model, progress=False)
    levels = [0.0, 1.0, math.sqrt(2.0)] if a.model.endswith("flow") else [0.0, 1.0]
    print(f"{a.model}, {a.steps} steps, pool {a.pool}: | eta | base vs data (x floor) | tilted base vs p* (x floor) | pool ESS |")
    for eta in levels:
        with torch.no_grad():
            x = Sampler(num_steps=a.steps, eta=eta).sample(model, [""] * a.pool, generator=torch.Generator().manual_seed(0),
                                                          with_logprob=False).final
        w = torch.softmax(quadratic(x).double() / a.beta, 0)
        ratios = [distance_to_optimum(x[torch.multinomial(w, 1000, replacement=True,
                                                          generator=torch.Generator().manual_seed(s))], a.beta)["ratio"]
                  for s in range(4)]
        mean = sum(ratios) / len(ratios)
        sd = (sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1)) ** 0.5
        print(f"| {eta:.3f} | {distance_to_data(x[:1000])['data_ratio']:.2f} | {mean:.2f} ± {sd:.2f} | "
              f"{float(1 / (w ** 2).sum()):.0f} |")


if __name__ == "__main__":
    main()
