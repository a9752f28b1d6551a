"""report.md and figures from a bench's results.json.

- a table like the seed papers' (mean ± sample std over seeds) for the base model and
  every method: training reward, held-out reward, held-out win rate against the base,
  diversity relative to the base, Fréchet distance, KL to the reference, reward
  queries, wall time (and on toy2d the distance to the exact optimum p*);
- reward_vs_queries.png: training-batch reward against reward queries (mean over seeds), and
  the fixed evaluation set's reward of base and final model against the queries spent;
- reward_vs_diversity.png: held-out (else training) reward against relative diversity: faint
  points per seed, the mean of each method variant joined into one front per algorithm;
- reward_vs_wall.png: the evaluation set's reward (held-out where the suite has one) against
  reward queries and against training wall time, base → periodic evaluations → final;
- a race table: reward queries and wall time each method needed to reach half of, and all of,
  the reference method's (GRPO's) gain over the base on the evaluation set;
- samples.png: the first seed's final evaluation samples for every method;
- with a reference method (`--reference`, `bench tune`): paired differences against it per seed, with
  bootstrap intervals (`bench.paired`); after `bench tune`, the trial budget behind the rows.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import checkpoint
from ..eval.core import pyplot
from .paired import paired_table

COLUMNS = [
    ("reward_mean", "training reward", "{:.3f}"),
    ("eval_reward_mean", "held-out reward", "{:.3f}"),
    ("eval_win_rate", "held-out win rate", "{:.2f}"),
    ("diversity_rel", "diversity (rel.)", "{:.2f}"),
    ("frechet", "Fréchet dist.", "{:.2f}"),
    ("kl", "KL (nats)", "{:.1f}"),
    ("optimum_distance", "dist. to p*", "{:.3f}"),
    ("optimum_ratio", "× floor", "{:.2f}"),
]


def _mean_std(values, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def summary_table(results: dict) -> str:
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = [c for c in COLUMNS if any(r.get(f"aligned_{c[0]}") is not None for r in rows)]
    if not results.get("budget"):  # no reward is trained on and no base to compare with: only the sample metrics
        cols = [c for c in cols if c[0] in ("frechet", "optimum_distance")]
    head = ["method", *[c[1] for c in cols], "reward queries", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = [r for r in rows if "failed" not in r][:1]  # the base is identical in every cell
    if not results.get("base_row", True):  # trained from scratch: the base is a random init
        base = []
    for label, group, prefix in [("base", base, "base")] * bool(base) + [(m, [r for r in rows if r["method"] == m], "aligned")
                                                            for m in methods]:
        failed = sum("failed" in r for r in group)
        if failed:
            label = f"{label} (diverged: {failed} of {len(group)} seeds)"
            group = [r for r in group if "failed" not in r]
        cells = [_mean_std([r.get(f"{prefix}_{k}") for r in group], fmt) for k, _, fmt in cols]
        q = "0" if prefix == "base" else _mean_std([r["reward_queries"] for r in group], "{:.0f}")
        w = "–" if prefix == "base" else _mean_std([r["wall_s"] for r in group], "{:.0f}")
        lines.append("| " + " | ".join([label, *cells, q, w]) + " |")
        if prefix == "base" and group[0].get("base_data_ratio") is not None:  # toy2d: the base's own fidelity
            fid = {"optimum_distance": "base_data_distance", "optimum_ratio": "base_data_ratio"}
            cells = [_mean_std([r.get(fid[k]) for r in group], fmt) if k in fid else "–" for k, _, fmt in cols]
            lines.append("| " + " | ".join(["base vs its training data", *cells, "0", "–"]) + " |")
    return "\n".join(lines)


def write_report(out: str | Path, results: dict) -> Path:
    out = Path(out)
    ok = {**results, "rows": [r for r in results["rows"] if "failed" not in r]}  # diverged runs: in the table only
    rewarded = bool(results.get("budget"))
    figs = [f for f in (reward_curves(out, ok) if rewarded else None, eval_curves(out, ok) if rewarded else None,
                        reward_vs_diversity(out, ok) if rewarded else None,
                        sample_grids(out, ok), multiplier_curves(out, ok)) if f] if ok["rows"] else []
    rows = results["rows"]
    n_seeds = len({r["seed"] for r in rows})
    budget = (f"{results['budget']} reward queries per run" if results["budget"]
              else "the same training steps and data per run (no reward queries)")
    lines = [
        f"# Bench: suite `{results['suite']}`, {budget}, {n_seeds} seed(s)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, torch "
        f"{results['machine']['torch']}; started {results['started']}, finished {results.get('finished', '–')}.",
        "",
        summary_table(results),
        "",
        (f"Mean ± sample standard deviation over seeds. Every model is evaluated on the same "
         f"{results['per_prompt']} fixed-noise samples per prompt. *Fréchet dist.*: between samples and real data in the "
         "evaluation feature space; *wall time*: training time on this machine." if not rewarded else
         f"Mean ± sample standard deviation over seeds. Every model is evaluated on the same "
        f"{results['per_prompt']} fixed-noise samples per prompt. *Training reward* is the reward optimised; "
        "*held-out reward* is a second, independently trained network. *Held-out win rate*: fraction of the fixed "
        "seeds where the aligned sample beats the base sample from the same noise. *Diversity (rel.)*: mean pairwise "
        "feature distance within a prompt, divided by the base's. *Fréchet dist.*: between samples and real data in "
        "the evaluation feature space. *KL*: path KL to the base, summed over steps. *Reward queries* count every "
        "call of the training reward on one image, including the pair set of the offline methods; *wall time* is "
        "training time (plus building the pair set for offline methods) on this machine."),
        "",
    ]
    if results.get("tuning"):
        lines += [tuning_note(results["tuning"]), ""]
    if feedback_note(results):
        lines += [feedback_note(results), ""]
    real = [r.get("aligned_frechet_real") for r in rows if r.get("aligned_frechet_real") is not None]
    if real:
        lines.append(f"For scale: the Fréchet distance of a random real-data sample of the same size is {real[0]:.2f} "
                     "(the estimate is biased upward at small sizes, most when there are fewer samples than feature "
                     "dimensions: compare models with each other at equal size, not with zero).")
    opt = [r for r in rows if r.get("aligned_optimum_floor") is not None]
    if opt:
        sd = [r["aligned_optimum_distance_sd"] for r in opt if r.get("aligned_optimum_distance_sd") is not None]
        lines.append(f"*dist. to p\\**: sliced Wasserstein distance to the exact KL-regularised optimum p* "
                     f"(β = {opt[0]['aligned_optimum_beta']}), each run's value the mean over independent draws of "
                     "p* (the yardstick" + (f"; its spread over draws is {statistics.mean(sd):.3f} on average" if sd else "")
                     + f"); *× floor*: that distance over the floor, the same mean distance between two exact "
                     f"samples of p* ({opt[0]['aligned_optimum_floor']:.3f}).")
        fid = [r for r in opt if r.get("base_data_distance") is not None]
        if fid:
            d, f = fid[0]["base_data_distance"], fid[0]["base_data_floor"]
            lines.append(f"*base vs its training data*: the base model's own distance to the mixture it was trained "
                         f"on, same measure ({d:.3f}, {d / f:.2f}× that comparison's floor {f:.3f}): the practical "
                         "limit, no aligned model can be expected to get nearer p* than that ratio.")
    shares = class_shares(results)
    if shares:
        lines += ["", shares]
    race = race_table(ok) if rewarded else ""
    if race:
        lines += ["", race]
    pairs = paired_table(results, results["reference"]) if results.get("reference") else ""
    if pairs:
        lines += ["", pairs]
    lines += ["", *[f"![{f.stem}]({f.name})" for f in figs], ""]
    path = out / "report.md"
    checkpoint.atomic_write_text(path, "\n".join(lines))
    return path


RULES = {"unpaired": "above their prompt's median reward", "imbalanced": "their prompt's top quarter by reward"}


def feedback_note(results: dict) -> str:
    """One line on the offline methods' feedback (`bench --feedback`), from the first offline row's
    counts (the same for every seed); "" when the bench has no offline rows."""
    f = next((r["feedback"] for r in results["rows"] if r.get("feedback")), None)
    if f is None:
        return ""
    if f["regime"] == "paired":
        return (f"Feedback: paired, {f['pairs']:,} pairs of base samples ranked by the training reward "
                "(Diffusion-KTO learns from their images, winners desirable).")
    return (f"Feedback: {f['regime']}, {f['images']:,} base samples labelled alone ({f['desirable']:,} desirable: "
            f"{RULES[f['regime']]}); KTO learns from the labels, DPO from the {f['pairs']:,} pairs formed from them.")


def tuning_note(t: dict) -> str:
    """One line for a report: the trial budget behind its rows."""
    keys = "; ".join(f"{m}: {', '.join(k)}" for m, k in t["keys"].items())
    return (f"Tuned: {t['trials']} trials per method ({t['trial_seeds']} seed each; the shipped config and draws "
            f"within ×/÷{t['spread']:g} of it) over {keys}, chosen by {t['metric']} on a validation split "
            f"({t['validation']}) that these rows do not use (`bench tune`: the trial table in ../tune.md, "
            "their runs in ../trials).")


def reached(curve: list, target: float) -> tuple[float, float] | None:
    """(reward queries, wall s) of the first evaluation at or above `target`, None if none is."""
    return next(((q, w) for q, v, w in curve if v is not None and v >= target), None)


RACE_REFERENCES = ("grpo", "ddpo")  # the method the race is run against: the first one the bench has


def race_table(results: dict, reference: str | None = None) -> str:
    """Reward queries and training wall time each method needed to reach the evaluation-set reward
    levels half-way and all the way from the reference method's base to its final reward (mean over the
    seeds that got there; evaluations come every `eval.every` epochs, so a value is the first evaluation
    past the level). A method evaluated with another sampler (NFT and AWM: the deterministic one) has
    another base: "0 (own base)" when that base is already past the level."""
    rows = [r for r in results["rows"] if r.get("eval_curve")]
    if reference is None:
        reference = next((m for m in RACE_REFERENCES if any(r["method"] == m for r in rows)), None)
    ref = [r for r in rows if r["method"] == reference]
    if not ref:
        return ""
    base = statistics.mean(r["eval_curve"][0][1] for r in ref)
    final = statistics.mean(r["eval_curve"][-1][1] for r in ref)
    if final <= base:
        return f"Race: {reference} did not improve on its base ({base:.4f} → {final:.4f}): no level to race to."
    levels = (base + 0.5 * (final - base), final)
    lines = [f"Race to {reference}'s evaluation-set reward: queries and training wall time to the first evaluation "
             f"at or past half-way ({levels[0]:.4f}) and all the way ({final:.4f}) from {reference}'s base "
             f"({base:.4f}) to its final reward (mean over the seeds that got there).", "",
             "| method | own base | final | half-way: queries | (wall s) | all the way: queries | (wall s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == m]
        cells = [f"{statistics.mean(r['eval_curve'][0][1] for r in group):.4f}",
                 f"{statistics.mean(r['eval_curve'][-1][1] for r in group):.4f}"]
        for level in levels:
            hits = [h for r in group if (h := reached(r["eval_curve"], level))]
            if not hits:
                cells += [f"not reached (0 of {len(group)})", "–"]
                continue
            note = "" if len(hits) == len(group) else f" ({len(hits)} of {len(group)})"
            queries = statistics.mean(q for q, _ in hits)
            walls = [w for _, w in hits if w is not None]
            cells += [("0 (own base)" if queries == 0 else f"{queries:.0f}") + note,
                      f"{statistics.mean(walls):.0f}" if len(walls) == len(hits) else "–"]
        lines.append("| " + " | ".join([m, *cells]) + " |")
    return "\n".join(lines)


def eval_curves(out: Path, results: dict) -> Path | None:
    """The evaluation set's reward against reward queries (left) and training wall time (right)."""
    rows = [r for r in results["rows"] if r.get("eval_curve")]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        curves = [r["eval_curve"] for r in rows if r["method"] == m]
        n = min(len(c) for c in curves)
        for ax, col in zip(axes, (0, 2)):
            xs = [statistics.mean(c[k][col] or 0 for c in curves) for k in range(n)]
            ys = [statistics.mean(c[k][1] for c in curves) for k in range(n)]
            ax.plot(xs, ys, marker=".", label=m, color=f"C{i % 10}")
    for ax, label in zip(axes, ("reward queries", "training wall time (s)")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("evaluation-set reward (held-out where there is one)")
    axes[1].legend(fontsize=7)
    return _save(plt, fig, out / "reward_vs_wall.png")


def class_shares(results: dict) -> str:
    """The suite's classes of interest: each one's share of the aligned samples (mean ± std over seeds)."""
    classes = results.get("classes") or []
    rows = [r for r in results["rows"] if r.get("aligned_class_histogram")]
    if not classes or not rows:
        return ""
    head = ["method", *[f"class {c}" for c in classes], "smallest", "Fréchet dist."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == m]
        cells = [_mean_std([r["aligned_class_histogram"][c] for r in group], "{:.3f}") for c in classes]
        low = _mean_std([min(r["aligned_class_histogram"][c] for c in classes) for r in group], "{:.3f}")
        lines.append("| " + " | ".join([m, *cells, low, _mean_std([r["aligned_frechet"] for r in group], "{:.2f}")]) + " |")
    n = len(rows[0]["aligned_class_histogram"])
    return "\n".join([f"Share of each class in the aligned models' samples under the held-out classifier (a fair share "
                      f"is {1 / n:.2f}); *smallest* is the least-sampled of these classes per seed.", "", *lines])


def multiplier_curves(out: Path, results: dict) -> Path | None:
    """mu.png: every constraint's multiplier against training epochs (first seed of each row)."""
    rows = [r for r in results["rows"] if r.get("mu_curve")]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in dict.fromkeys(r["method"] for r in rows):
        r = next(r for r in rows if r["method"] == m)
        for name in r["mu_curve"][0][1]:
            ax.plot([e for e, _ in r["mu_curve"]], [d[name] for _, d in r["mu_curve"]], label=f"{m}: μ {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("multiplier μ (epoch mean)")
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "mu.png")


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def reward_curves(out: Path, results: dict) -> Path | None:
    """Left: training-batch reward per epoch (what each method saw; for the branching methods
    these are their selected/guided paths, not plain policy samples). Right: the same reward
    on the fixed evaluation set, base (0 queries) and final model — comparable across methods."""
    plt = pyplot()
    rows = results["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        g = [r for r in rows if r["method"] == m]
        curves = [r["curve"] for r in g if r["curve"]]
        color = f"C{i % 10}"
        if curves:
            n = min(len(c) for c in curves)  # same query grid for every seed (the cost of an epoch is fixed)
            xs = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
            ys = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(xs, ys, marker=".", label=m, color=color)
        x = statistics.mean(r["reward_queries"] for r in g)
        y0 = statistics.mean(r["base_reward_mean"] for r in g)
        y1 = [r["aligned_reward_mean"] for r in g]
        bx.errorbar([0, x], [y0, statistics.mean(y1)],
                                yerr=[0, statistics.stdev(y1) if len(y1) > 1 else 0], marker="o", capsize=3,
                                linestyle="--", color=color, label=m)
    ax.set_title("training batches (branching methods: their chosen paths)", fontsize=9)
    bx.set_title("fixed evaluation set: base → final (mean ± std over seeds)", fontsize=9)
    for a in (ax, bx):
        a.set_xlabel("reward queries")
        a.grid(alpha=0.3)
    ax.set_ylabel("training reward")
    bx.legend(fontsize=7)
    return _save(plt, fig, out / "reward_vs_queries.png")


def reward_vs_diversity(out: Path, results: dict) -> Path | None:
    plt = pyplot()
    rows = results["rows"]
    key = "eval_reward_mean" if any(r.get("aligned_eval_reward_mean") is not None for r in rows) else "reward_mean"
    if not any(r.get("aligned_diversity_rel") is not None for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter([1.0], [rows[0][f"base_{key}"]], marker="*", s=150, color="k", label="base")
    # one colour per algorithm; its variants (name@key=value) are the points of a front, joined by a line
    for i, alg in enumerate(dict.fromkeys(r.get("algorithm", r["method"]) for r in rows)):
        means = []
        for label in dict.fromkeys(r["method"] for r in rows if r.get("algorithm", r["method"]) == alg):
            g = [r for r in rows if r["method"] == label]
            xs, ys = [r["aligned_diversity_rel"] for r in g], [r[f"aligned_{key}"] for r in g]
            ax.scatter(xs, ys, color=f"C{i % 10}", alpha=0.3, s=12)
            means.append((sum(xs) / len(xs), sum(ys) / len(ys), label.partition("@")[2].replace("args.", "")))
        means.sort()
        ax.plot([m[0] for m in means], [m[1] for m in means], "o-", color=f"C{i % 10}", label=alg, ms=5)
        for x, y, text in means:
            if text:
                ax.annotate(text, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("diversity relative to base")
    ax.set_ylabel("held-out reward" if key == "eval_reward_mean" else "training reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "reward_vs_diversity.png")


def sample_grids(out: Path, results: dict) -> Path | None:
    plt = pyplot()
    rows = results["rows"]
    first = {}
    for r in rows:
        first.setdefault(r["method"], r)
    panels = [("base", Path(rows[0]["run"]) / "samples" / "base.png")] if rows else []
    panels += [(m, Path(r["run"]) / "samples" / "final.png") for m, r in first.items()]
    panels = [(m, p) for m, p in panels if p.exists()]
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (m, p) in zip(axes.flat, panels):
        ax.imshow(plt.imread(str(p)))
        ax.set_title(m, fontsize=9)
    return _save(plt, fig, out / "samples.png")


def report_from_folder(out: str | Path) -> Path:
    """Rewrite report.md and the figures from an existing results.json."""
    return write_report(out, json.loads((Path(out) / "results.json").read_text()))
