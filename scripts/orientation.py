"""How upright the digits-rotated bench's models draw: Kawata et al.'s (DDO, arXiv 2502.02954) orientation experiment.

    python scripts/orientation.py runs/bench-digits-rotated   # after `diffalign bench --suite digits-rotated`

For the base model and every finished run in BENCH_OUT/runs/<method>/seed-<s>, samples the run's fixed evaluation
noise and measures: the predicted |angle| under the angle judge (`diffalign.rewards.orientation`: mean, median,
share within 10°; the held-out judge's mean as a check that the first is not fooled), held-out digit accuracy
(`classifier_heldout`, a network trained on upright digits) and diversity (the bench's: mean pairwise distance
in the held-out classifier's features within a digit). Prints a markdown table, mean ± std over seeds, and
writes BENCH_OUT/orientation.md, orientation.json and orientation.png (angle histograms, base vs each method).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch


def measure(model, images: torch.Tensor, prompts: list[str]) -> dict:
    """Orientation, held-out accuracy and diversity of decoded digit samples."""
    from diffalign.eval.core import sample_metrics
    from diffalign.rewards import digits as rd
    from diffalign.rewards.orientation import predict_angle

    angle = predict_angle(images)
    size = angle.abs()
    with torch.no_grad():
        correct = rd.load_classifier(heldout=True)(images).argmax(1) == rd.prompt_labels(prompts)
    return {"angles": [round(float(a), 2) for a in angle], "abs_angle_mean": float(size.mean()),
            "abs_angle_median": float(size.median()), "within_10": float((size < 10).float().mean()),
            "abs_angle_heldout": float(predict_angle(images, heldout=True).abs().mean()),
            "heldout_accuracy": float(correct.float().mean()),
            "diversity": sample_metrics(model, images, prompts)["diversity"]}


def final_samples(run_dir: Path, base: bool = False):
    """(model, decoded samples, prompts) of the run's final model (or its base) on its evaluation noise."""
    from diffalign.eval import base_context, load_run, sample_eval
    from diffalign.eval.core import eval_sampler

    lr = load_run(run_dir, finished=True)
    sampler = eval_sampler(lr.run.sampler if base else lr.sampler, lr.cfg.eval.sampling)
    with base_context(lr.run) if base else contextlib.nullcontext():
        images, _, prompts = sample_eval(lr.run.model, sampler, lr.run.prompts, lr.cfg.eval.per_prompt,
                                         lr.cfg.eval.seed)
    return lr.run.model, images, prompts


def finished_runs(out: Path) -> dict[str, list[Path]]:
    """{method: its finished run folders}, in the bench's method order."""
    bench = out / "bench.json"
    order = json.loads(bench.read_text())["methods"] if bench.exists() else []
    found = {d.name: sorted(r for r in d.glob("seed-*") if (r / "summary.json").exists())
             for d in (out / "runs").iterdir() if d.is_dir()}
    return {m: found[m] for m in sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m))
            if found[m]}


COLUMNS = [("abs_angle_mean", "mean abs angle (°)", 1), ("abs_angle_median", "median abs angle (°)", 1),
           ("within_10", "within 10°", 2), ("abs_angle_heldout", "mean abs angle, held-out judge (°)", 1),
           ("heldout_accuracy", "held-out accuracy", 3), ("diversity", "diversity", 2)]


def cell(values: list[float], digits: int) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.{digits}f}" + (f" ± {float(t.std()):.{digits}f}" if len(t) > 1 else "")


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| model | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, results in rows.items():
        lines.append(f"| {name} | {len(results)} | "
                     + " | ".join(cell([r[k] for r in results], d) for k, _, d in COLUMNS) + " |")
    return "\n".join(lines)


def histogram(rows: dict[str, list[dict]], path: Path) -> None:
    from diffalign.eval.core import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = torch.linspace(-60, 60, 25).tolist()
    for i, (name, results) in enumerate(rows.items()):
        angles = [a for r in results for a in r["angles"]]
        style = {"color": "0.7", "histtype": "stepfilled"} if i == 0 else {"histtype": "step", "linewidth": 1.5}
        ax.hist(angles, bins=bins, density=True, label=name, **style)
    ax.set_xlabel("predicted angle (degrees, counter-clockwise)")
    ax.set_ylabel("density")
    ax.set_title("digits-rotated: orientation of the samples (all seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(out: str) -> None:
    out = Path(out)
    runs = finished_runs(out)
    if not runs:
        raise SystemExit(f"no finished runs in {out / 'runs'}: run `diffalign bench --suite digits-rotated` first")
    first = next(iter(runs.values()))[0]  # every run has the same base, sampler and evaluation noise
    rows = {"base": [measure(*final_samples(first, base=True))]}
    for method, dirs in runs.items():
        rows[method] = [{"seed": int(d.name.split("-")[1]), **measure(*final_samples(d))} for d in dirs]
        print(f"{method}: {len(dirs)} runs measured", file=sys.stderr)
    text = table(rows)
    print(text)
    (out / "orientation.md").write_text(text + "\n")
    (out / "orientation.json").write_text(json.dumps(rows, indent=1))
    histogram(rows, out / "orientation.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-digits-rotated")
