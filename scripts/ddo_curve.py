"""DDO on toy2d: distance to p* per dual-averaging iteration, against the floor and the base
model's own fidelity (its distance to its training data at the same n).

    python scripts/ddo_curve.py runs/bench-toy2d     # after `diffalign bench --suite toy2d` (with ddo, ddo-dpo)

Writes OUT/ddo_iterations.png and OUT/ddo_iterations.json and prints a table.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import yaml


def base_fidelity(n: int, seeds=(0, 1, 2)) -> dict:
    """Sliced W2 of n base samples to n data samples, and of n data samples to n others (the floor),
    averaged over `seeds` base samples, each against the yardstick draws of `toy2d.distance_to_data`
    (what every toy2d evaluation reports)."""
    from diffalign.models import load_model
    from diffalign.models.toy2d import distance_to_data
    from diffalign.sampler import Sampler

    model = load_model("toy2d", progress=False)
    rows = []
    for s in seeds:
        with torch.no_grad():
            x = Sampler(num_steps=20, eta=1.0).sample(model, [""] * n, generator=torch.Generator().manual_seed(s),
                                                      with_logprob=False).final
        rows.append(distance_to_data(x, seed=s))
    return {"n": n, "base_to_data": sum(r["data_distance"] for r in rows) / len(rows),
            "floor": sum(r["data_floor"] for r in rows) / len(rows)}


@functools.lru_cache(maxsize=None)
def final_sample(run_dir: Path) -> torch.Tensor:
    """The run's aligned model sampled on its evaluation noise (once per run)."""
    from diffalign.eval import load_run
    from diffalign.eval.core import sample_eval

    lr = load_run(run_dir)
    with torch.no_grad():
        return sample_eval(lr.run.model, lr.sampler, [""], lr.cfg.eval.per_prompt, lr.cfg.eval.seed)[0]


def distance_to_target(run_dir: Path, draw) -> dict:
    """The final model's evaluation sample against samples `draw(n, generator)` of a target, averaged over
    the same number of independent draws as the bench's distance to p* (`toy2d.YARDSTICK_DRAWS`)."""
    from diffalign.models.toy2d import YARDSTICK_DRAWS, yardstick_distance

    return yardstick_distance(final_sample(run_dir), draw, seed=0, n_proj=256, draws=YARDSTICK_DRAWS)


@functools.lru_cache(maxsize=None)
def dpo_grid_optimum(beta: float, gamma: float, n_grid: int = 50, iters: int = 150, lo=-3.0, hi=3.6):
    """The exact minimiser of F = L_DPO + β KL for toy2d (pairs ~ p_ref², Bradley–Terry labels on the quadratic
    reward at temperature 1), by dual averaging (Option 2) with exact assignment on an n_grid² grid.
    Returns (cell centres (G, 2), q (G,), cell width)."""
    from diffalign.losses import ddo as da
    from diffalign.models.toy2d import log_prob
    from diffalign.rewards.toy2d import quadratic

    axis = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    pts = torch.cartesian_prod(axis, axis)
    p = torch.softmax(log_prob(pts), 0)
    r = quadratic(pts)
    f = torch.zeros_like(p)
    for k in range(1, iters + 1):
        q = torch.softmax(-f + p.log(), 0)
        fv = da.clip(da.dpo_population_first_variation(torch.log(q / p), r, p, gamma))  # clipped, as the method
        f = da.da_target(f, fv, k, 2, beta, beta)
    return pts.float(), torch.softmax(-f + p.log(), 0).float(), float(axis[1] - axis[0])


def grid_sample(pts, q, width, n, generator):
    idx = torch.multinomial(q, n, replacement=True, generator=generator)
    return pts[idx] + (torch.rand(n, 2, generator=generator) - 0.5) * width


def curves(out: Path) -> dict:
    res = {}
    for method_dir in sorted((out / "runs").iterdir()):
        runs = []
        for run in sorted(method_dir.glob("seed-*")):
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            base = json.loads((run / "eval_base.json").read_text())
            pts = [(0, base["optimum_distance"], base["optimum_floor"])]
            pts += [(r["epoch"] + 1, r["eval_optimum_distance"], r["eval_optimum_floor"]) for r in rows
                    if "eval_optimum_distance" in r]
            summary = run / "summary.json"
            if summary.exists():
                s = json.loads(summary.read_text())
                pts.append((s["epochs"], s["final"]["optimum_distance"], s["final"]["optimum_floor"]))
            runs.append(pts)
        res[method_dir.name] = runs
    return res


def main(out: str) -> None:
    from diffalign.eval.core import pyplot

    out = Path(out)
    res = curves(out)
    n = json.loads((out / "bench.json").read_text())["per_prompt"]
    fid = base_fidelity(n)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    floor = None
    for (name, runs), colour in zip([(k, v) for k, v in res.items() if k.startswith("ddo")], ("C0", "C1", "C2")):
        for i, pts in enumerate(runs):
            k, d, f = zip(*pts)
            floor = f[0]
            ax.plot(k, d, "o-", color=colour, alpha=0.7, label=name if i == 0 else None)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", label=f"floor (two samples of p*, n={n})")
        ax.axhline(1.5 * floor, color="k", ls=":", label="1.5 × floor (goal)")
        ax.axhline(floor * fid["base_to_data"] / fid["floor"], color="grey", ls="-.",
                   label=f"base's own fidelity ({fid['base_to_data'] / fid['floor']:.2f} × floor)")
    ax.set_xlabel("dual-averaging iteration")
    ax.set_ylabel("sliced W2 to p* (β = 1)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("DDO on toy2d: distance to the exact optimum")
    fig.tight_layout()
    fig.savefig(out / "ddo_iterations.png", dpi=120)
    print(f"base fidelity at n={n}: {fid['base_to_data']:.4f} vs floor {fid['floor']:.4f} "
          f"({fid['base_to_data'] / fid['floor']:.2f}x)")
    to_f = {}
    for name in res:
        if name.startswith("diffusion-") or name == "ddo-dpo":  # learned from the DPO pairs: F's own optimum too
            # the other methods on the same pairs are measured against ddo-dpo's F
            args = yaml.safe_load((out / "runs" / "ddo-dpo" / "seed-0" / "config.yaml").read_text())["args"]
            beta, gamma = args["beta"], args["gamma"]
            pts, q, width = dpo_grid_optimum(beta, gamma)
            to_f[name] = [distance_to_target(run, lambda m, g: grid_sample(pts, q, width, m, g))
                          for run in sorted((out / "runs" / name).glob("seed-*")) if (run / "summary.json").exists()]
            print(f"{name}: distance to the exact optimum of F_DPO (β = {beta}, γ = {gamma}) / its floor: "
                  + ", ".join(f"{r['ratio']:.2f}" for r in to_f[name]))
    (out / "ddo_iterations.json").write_text(json.dumps({"curves": res, "base_fidelity": fid,
                                                                    "to_dpo_optimum": to_f},
                                                        indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-toy2d")
