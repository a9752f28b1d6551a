"""Adaptation without memorisation (Khalafi, Ding & Ribeiro, "Constrained Diffusion Models via Dual Training", NeurIPS 2024, experiment 2).

Fine-tunes the pretrained digits model on 20 images of one digit (configs/constrained_adapt_digits.yaml),
without a constraint and with one that keeps its denoising loss on the pretrained model's
own samples within `slack` of the start, and measures each model (and the pretrained base):

- memorisation: the mean distance (pixels in [0, 1], 8x8) from each sample to its nearest
  of the 20 training images, against the same distance for held-out real images of that
  digit (the test split): a model that copies its training images sits far below the
  held-out level; `copies` is the fraction of samples nearer a training image than the
  nearest held-out image ever gets;
- diversity (mean pairwise distance in the held-out classifier's features) and the
  Fréchet distance to every real image of that digit.

    python scripts/adaptation.py OUT [--seeds 3] [--samples 300]

Runs are ordinary training runs in OUT/<row>/seed-<s> (rerunning resumes or reuses them);
results go to OUT/results.json and are printed as a table. About 3 minutes per seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ROWS = {"unconstrained": ["args.constraints=[]"], "constrained": []}


def nn_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each image of `a`, the L2 distance to its nearest image in `b` (flattened pixels)."""
    return torch.cdist(a.flatten(1).float(), b.flatten(1).float()).min(1).values


def measure(model, sampler, prompt: str, train_images, heldout, real_class, n: int, seed: int) -> dict:
    from diffalign.eval.core import sample_eval
    from diffalign.eval.metrics import frechet_distance, pairwise_diversity
    from diffalign.eval.spaces import get_space

    images, _, _ = sample_eval(model, sampler, [prompt], n, seed)
    d_samples, d_heldout = nn_distance(images.cpu(), train_images), nn_distance(heldout, train_images)
    space = get_space(model)
    feats = space.features(images).cpu()
    return {"nn_train": float(d_samples.mean()), "nn_heldout": float(d_heldout.mean()),
            "memorisation": float(d_samples.mean() / d_heldout.mean()),
            "copies": float((d_samples < d_heldout.min()).float().mean()),
            "diversity": pairwise_diversity(feats), "frechet": frechet_distance(feats, space.features(real_class).cpu())}


def main() -> None:
    from diffalign.data import datasets
    from diffalign.eval.run import load_run
    from diffalign.train import resolve_config, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--config", default="configs/constrained_adapt_digits.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=300)
    a = ap.parse_args()
    out = Path(a.out)
    cfg, _ = resolve_config(a.config)
    digit = cfg.prompts[0]
    train_images = datasets.load(cfg.args["data"]).images
    heldout = datasets.load(f"digits:split=test:classes={digit}").images
    real_class = datasets.load(f"digits:split=all:classes={digit}").images
    results = {"config": a.config, "digit": digit, "train_images": len(train_images), "heldout_images": len(heldout),
               "rows": []}
    for seed in range(a.seeds):
        for row, overrides in ROWS.items():
            run = out / row / f"seed-{seed}"
            if not (run / "summary.json").exists():
                c, args = resolve_config(a.config, [f"seed={seed}", *overrides])
                train(c, args, run, resume=(run / "config.yaml").exists())
            loaded = load_run(run, finished=True)
            m = measure(loaded.run.model, loaded.sampler, digit, train_images, heldout, real_class, a.samples, seed)
            if row == "unconstrained" and seed == 0:  # the pretrained model, on the same noise
                with loaded.run.reference():
                    base = measure(loaded.run.model, loaded.run.sampler, digit, train_images, heldout, real_class,
                                   a.samples, seed)
                results["rows"].append({"row": "pretrained", "seed": 0, **base})
            results["rows"].append({"row": row, "seed": seed, **m})
            print(row, seed, {k: round(v, 3) for k, v in m.items()}, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    keys = ["nn_train", "nn_heldout", "memorisation", "copies", "diversity", "frechet"]
    print("| model | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for row in ["pretrained", *ROWS]:
        group = [r for r in results["rows"] if r["row"] == row]
        cells = [f"{statistics.mean(r[k] for r in group):.3f}" + (
            f" ± {statistics.stdev(r[k] for r in group):.3f}" if len(group) > 1 else "") for k in keys]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
