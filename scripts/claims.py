"""The source papers' claims, tested: write the claims table into README.md from the bench results under
docs/bench/, between `<!-- claims: python scripts/claims.py -->` and `<!-- /claims -->`.

Each row is one claim, read as a difference between two rows of one bench (method − reference on the same
seed: `diffalign.bench.paired`), or as a level one row must reach; the interval is the 95% percentile
bootstrap over seeds. The verdict is mechanical, so it cannot be argued into a result:
- holds: the interval lies on the claimed side of 0 (or of the level);
- does not hold here: it lies on the other side;
- not decided: it contains 0 (the level);
- with fewer than 5 seeds any of these reads "(n < 5: indicative)".

    python scripts/claims.py            # rewrite the README's table
    python scripts/claims.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- claims: python scripts/claims.py -->", "<!-- /claims -->"
sys.path.insert(0, str(ROOT / "src"))

from diffalign.bench.paired import MIN_SEEDS, bootstrap_ci, paired  # noqa: E402


@dataclass
class Claim:
    paper: str  # short name, linked in the README's paper list
    claim: str  # the claim in one line
    bench: str  # folder under docs/bench
    method: str  # the row the claim is about (in a tuned bench, a method's name stands for its chosen setting)
    reference: str | None  # the row it is compared with (None: `level` is the yardstick)
    metric: str  # aligned_<metric> in results.json (orientation.json's key for source "orientation");
    # smallest_share / largest_share: over the minority classes
    higher: bool  # True: the claim says the method's value is higher
    setting: str  # our setting in one line
    level: float = 0.0  # with no reference: the value the claim needs
    names: str = ""  # how the result column names the difference (default: the two row labels)
    source: str = "results"  # "orientation": scripts/orientation.py's per-seed measures (its base row: one sample set)


CLAIMS = [
    Claim("TailorPO", "TailorPO-G (gradient guidance) beats TailorPO on reward", "digits-tailorpo10", "tailorpo-g",
          "tailorpo", "eval_reward_mean", True, "digits, held-out reward, 2,048 queries, shipped configs (the same "
          "but for guidance), 10 seeds"),
    Claim("TailorPO", "TailorPO-G stays closer to the data than TailorPO", "digits-tailorpo10", "tailorpo-g",
          "tailorpo", "frechet", False, "digits, Fréchet distance to real digits, as above"),
    Claim("TailorPO", "TailorPO beats D3PO at equal samples", "tailorpo-tuned", "tailorpo", "d3po", "eval_reward_mean",
          True, "digits, held-out reward, 2,048 queries, each tuned (6 trials × 2 seeds), 5 seeds"),
    Claim("TailorPO", "D3PO ≈ DDPO (DDPO not ahead)", "tailorpo-tuned", "ddpo", "d3po", "eval_reward_mean", False,
          "as above"),
    Claim("∇-GFlowNet", "keeps more diversity than AlignProp at comparable reward", "digits-nabla10",
          "nabla-gfn@args.beta=10", "alignprop@optim.lr=1e-4", "diversity_rel", True,
          "digits, 2,048 queries, ∇-GFN β = 10 vs AlignProp lr 1e-4 (held-out reward −0.148 vs −0.181), 10 seeds",
          names="∇-GFN − AlignProp, diversity"),
    Claim("∇-GFlowNet", "keeps more diversity than DRaFT at comparable reward", "digits-nabla10",
          "nabla-gfn@args.beta=10", "draft@optim.lr=3e-4", "diversity_rel", True,
          "as above vs DRaFT lr 3e-4 (held-out −0.121: more reward), 10 seeds",
          names="∇-GFN − DRaFT, diversity"),
    Claim("Diffusion-KTO", "KTO ≥ DPO (paired feedback)", "kto-paired", "diffusion-kto@optim.lr=0.00103@args.beta=713",
          "diffusion-dpo@optim.lr=0.00964@args.beta=3860", "eval_reward_mean", True,
          "digits, held-out reward, 1,024 reward-ranked pairs, each tuned (8 trials × 2 seeds), 5 seeds",
          names="KTO − DPO"),
    Claim("Diffusion-KTO", "KTO ≥ DPO (unpaired labels: KTO's regime)", "kto-unpaired", "diffusion-kto",
          "diffusion-dpo@optim.lr=0.00964@args.beta=3860", "eval_reward_mean", True,
          "2,048 labels (median split); DPO on the 1,024 pairs they form; tuned, 5 seeds", names="KTO − DPO"),
    Claim("Diffusion-KTO", "KTO ≥ DPO (imbalanced labels, 1 : 3)", "kto-imbalanced", "diffusion-kto",
          "diffusion-dpo@optim.lr=0.00177@args.beta=338", "eval_reward_mean", True,
          "2,048 labels (top quarter); DPO on the 510 pairs they form; tuned, 5 seeds", names="KTO − DPO"),
    Claim("Constrained diffusion", "every minority class sampled at ≥ 0.09 (fair 0.10)", "digits-minority-alpha",
          "constrained-resilient@args.resilient_alpha=0.4", None, "smallest_share", True,
          "digits, classes 4, 5, 7 cut to a quarter, resilient α = 0.4, 3 seeds", level=0.09,
          names="smallest minority share"),
    Claim("Constrained diffusion", "... without over-sampling them (≤ 0.13)", "digits-minority-alpha",
          "constrained-resilient@args.resilient_alpha=0.4", None, "largest_share", False, "as above", level=0.13,
          names="largest minority share"),
    Claim("DDO", "DDO-DPO turns a rotated base toward upright (orientation experiment)", "rotated-tuned", "ddo-dpo",
          "base", "abs_angle_mean", False, "digits-rotated (±45°), 1,024 pairs preferring the less-rotated image, "
          "mean \\|angle\\| under the angle judge, learned Doob correction, each tuned (6 trials × 2 seeds on "
          "held-out reward), 3 seeds",
          names="DDO-DPO − base, mean \\|angle\\| (°)", source="orientation"),
    Claim("DDO", "... further than Diffusion-DPO on the same pairs", "rotated-tuned", "ddo-dpo", "diffusion-dpo",
          "abs_angle_mean", False, "as above", names="DDO-DPO − Diffusion-DPO, mean \\|angle\\| (°)",
          source="orientation"),
    Claim("DDO", "converges to the KL-regularised optimum p* (≤ 1.3× the floor)", "toy2d",
          "ddo@args.estimator=continuation", None, "optimum_ratio", False,
          "toy2d, exact p*, 4,096 queries, Monte Carlo Doob continuations, 3 seeds", level=1.3,
          names="distance to p* / floor"),
    Claim("Adjoint Matching", "converges to p* (≤ 1.3× the floor)", "am-flow-5seeds", "adjoint-matching", None,
          "optimum_ratio", False, "toy2d-flow, exact p*, 4,096 queries, shipped config, 5 seeds", level=1.3,
          names="distance to p* / floor"),
    Claim("Adjoint Matching", "... and with 4× the queries", "am-flow-4x-5seeds", "adjoint-matching", None,
          "optimum_ratio", False, "as above, 16,384 queries", level=1.3, names="distance to p* / floor"),
]


def _results(bench: str) -> dict:
    return json.loads((ROOT / "docs" / "bench" / bench / "results.json").read_text())


def orientation_values(bench: str, method: str, reference: str, metric: str) -> list[float]:
    """Per seed, the method's measure minus the reference's on the same seed (the base: the same for every seed)."""
    rows = json.loads((ROOT / "docs" / "bench" / bench / "orientation.json").read_text())
    ref = {r.get("seed"): r[metric] for r in rows[reference]}
    return [r[metric] - (ref[None] if reference == "base" else ref[r["seed"]]) for r in rows[method]
            if reference == "base" or r["seed"] in ref]


def values(c: Claim) -> list[float]:
    results = _results(c.bench)
    rows = results["rows"]
    chosen = (results.get("tuning") or {}).get("chosen", {})  # a tuned bench: a method's name means its chosen trial
    method, reference = chosen.get(c.method, c.method), chosen.get(c.reference, c.reference)
    if c.source == "orientation":
        return orientation_values(c.bench, method, reference, c.metric)
    if reference is not None:
        return paired(rows, method, reference, c.metric)
    if c.metric in ("smallest_share", "largest_share"):  # over the bench's minority classes, per seed
        pick = min if c.metric == "smallest_share" else max
        return [pick(r["aligned_class_histogram"][k] for k in results["classes"]) for r in rows
                if r["method"] == method and "failed" not in r]
    return [r[f"aligned_{c.metric}"] for r in rows if r["method"] == method and r.get(f"aligned_{c.metric}") is not None]


def verdict(lo: float, hi: float, n: int, higher: bool, level: float = 0.0) -> str:
    above, below = lo > level, hi < level
    v = "not decided" if not (above or below) else ("holds" if above == higher else "does not hold here")
    return v if n >= MIN_SEEDS else f"{v} (n < {MIN_SEEDS}: indicative)"


def row(c: Claim) -> str:
    v = values(c)
    lo, hi = bootstrap_ci(v)
    what = c.names or (f"{c.method} − {c.reference}" if c.reference else c.method)
    result = f"{what}: {np.mean(v):+.3f} [{lo:+.3f}, {hi:+.3f}], n = {len(v)}"
    if c.reference is None:
        result = f"{what}: {np.mean(v):.3f} [{lo:.3f}, {hi:.3f}] (needs {'≥' if c.higher else '≤'} {c.level}), n = {len(v)}"
    link = f"[report](docs/bench/{c.bench}/report.md)"
    return f"| {c.paper} | {c.claim} | {c.setting} | {result} | {verdict(lo, hi, len(v), c.higher, c.level)} | {link} |"


def table() -> str:
    head = ["| paper | claim | our setting | our result: mean [95% interval] | verdict | command |",
            "|---|---|---|---|---|---|"]
    return "\n".join(head + [row(c) for c in CLAIMS])


def main() -> int:
    from readme_block import write_block

    return write_block(START, END, table())


if __name__ == "__main__":
    sys.exit(main())
