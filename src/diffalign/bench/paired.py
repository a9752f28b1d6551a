"""Paired differences between bench rows, with bootstrap intervals: which differences are real.

Two cells of one bench with the same seed share everything the seed fixes (the training seed, the pair
set of the offline methods) and every cell shares the fixed evaluation noise, so a method's value minus
the reference's value *on the same seed* removes the part of the spread the two have in common. The
interval is the percentile bootstrap over seeds (resampling the per-seed differences with replacement):
with few seeds it is too narrow, so the table states n and the report says so.
"""

from __future__ import annotations

import numpy as np

MIN_SEEDS = 5  # fewer paired seeds: the interval is shown but not read as a verdict (not bold)

# (metric, column label, format, True when higher is better)
PAIRED_METRICS = [
    ("reward_mean", "training reward", "{:+.3f}", True),
    ("eval_reward_mean", "held-out reward", "{:+.3f}", True),
    ("eval_win_rate", "held-out win rate", "{:+.2f}", True),
    ("diversity_rel", "diversity (rel.)", "{:+.2f}", True),
    ("frechet", "Fréchet dist.", "{:+.2f}", False),
    ("optimum_ratio", "× floor", "{:+.2f}", False),
]


def bootstrap_ci(values, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (deterministic for a given seed)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {v.size}")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired(rows: list[dict], method: str, reference: str, key: str) -> list[float]:
    """Per-seed differences method − reference of `aligned_<key>`, over the seeds both have."""
    ref = {r["seed"]: r.get(f"aligned_{key}") for r in rows if r["method"] == reference and "failed" not in r}
    out = []
    for r in rows:
        if r["method"] == method and "failed" not in r and r.get(f"aligned_{key}") is not None:
            if ref.get(r["seed"]) is not None:
                out.append(r[f"aligned_{key}"] - ref[r["seed"]])
    return out


def paired_table(results: dict, reference: str) -> str:
    """Markdown: every other method minus `reference`, per metric: the mean paired difference and its
    95% bootstrap interval; **bold** when the interval excludes 0. Empty when there is nothing to pair."""
    rows = results["rows"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != reference]
    if not any(r["method"] == reference for r in rows) or not methods:
        return ""
    cols = [c for c in PAIRED_METRICS if any(len(paired(rows, m, reference, c[0])) >= 2 for m in methods)]
    if not cols:
        return ""
    lines = [f"Paired differences against `{reference}` (method − {reference} on the same seed; mean and 95% "
             f"percentile-bootstrap interval over seeds; **bold**: the interval excludes 0 with n ≥ {MIN_SEEDS} seeds. "
             "With fewer the bootstrap interval is too narrow to decide anything.)", "",
             "| method | n | " + " | ".join(f"Δ {c[1]} ({'↑' if c[3] else '↓'} better)" for c in cols) + " |",
             "|---|---:|" + "---|" * len(cols)]
    for m in methods:
        cells, n = [], 0
        for key, _, fmt, _ in cols:
            d = paired(rows, m, reference, key)
            n = max(n, len(d))
            if len(d) < 2:
                cells.append("–")
                continue
            lo, hi = bootstrap_ci(d)
            text = f"{fmt.format(float(np.mean(d)))} [{fmt.format(lo)}, {fmt.format(hi)}]"
            cells.append(f"**{text}**" if (lo > 0 or hi < 0) and len(d) >= MIN_SEEDS else text)
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
