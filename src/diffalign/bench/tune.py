"""`diffalign bench tune`: every method tuned with the same number of trials, then compared on fresh seeds.

A comparison where one method runs at its paper's settings and the other at settings made for a
different model says little. Here each method gets `trials` runs over its own key hyperparameters:
the learning rate and the weight of its regulariser (`args.beta`, else `args.kl_weight` / `args.kl_beta`
where the method has one). Trial 0 is the method's config as shipped; the others draw each value
log-uniformly within ×/÷ `spread` of it (a fixed generator: the same trials on every rerun).

The trials are scored on a validation split that the final numbers never see: training seeds from
`TRIAL_SEED` on, and the evaluation noise of `eval.seed = VALIDATION_EVAL_SEED` instead of the configs'
own. The best trial of each method (by `metric`, mean over the trial seeds) then runs on seeds
0..seeds-1 with the configs' evaluation noise: an ordinary bench (OUT/final) whose report states the
trial budget and carries the paired differences against the reference method.

OUT/trials is the trials' own bench folder, OUT/tune.json the choice, OUT/tune.md the trial table.
Resumable like every bench: rerun the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import checkpoint

TRIAL_SEED = 100  # trials train on seeds 100.. (the final comparison on 0..)
VALIDATION_EVAL_SEED = 4321  # the trials' evaluation noise (the configs' own is 1234)
REGULARISERS = ("beta", "kl_weight", "kl_beta")  # the first one a method's args have (and is > 0) is tuned
LOWER_IS_BETTER = {"optimum_ratio", "optimum_distance", "frechet", "kl"}


def default_metric(suite: str) -> str:
    """toy2d suites have the exact optimum; the others a held-out reward network."""
    return "optimum_ratio" if suite.startswith("toy2d") else "eval_reward_mean"


def fmt(value: float) -> str:
    """A value as --set writes it: plain decimal digits (YAML reads '3e-05' as a string)."""
    return np.format_float_positional(float(value), precision=3, unique=False, fractional=False, trim="-")


def space(suite: str, method: str, configs, overrides=()) -> dict[str, float]:
    """The tuned keys of one method and their values in its config: {'optim.lr': .., 'args.beta': ..}."""
    from ..methods import resolve_config
    from .suite import cell_overrides, config_path, plan

    p = plan(suite, [method], overrides=overrides)
    cfg, args = resolve_config(config_path(configs, method, suite), cell_overrides(p, method, configs))
    keys = {"optim.lr": cfg.optim.lr}
    reg = next((k for k in REGULARISERS if float(getattr(args, k, 0) or 0) > 0), None)
    if reg:
        keys[f"args.{reg}"] = float(getattr(args, reg))
    return keys


def trials(method: str, keys: dict[str, float], n: int, spread: float = 10.0, seed: int = 0) -> list[str]:
    """n variant labels: the config itself, then log-uniform draws within ×/÷ spread of each value."""
    if n < 1:
        raise ValueError(f"--trials must be >= 1, got {n}")
    rng = np.random.default_rng([seed, sum(method.encode())])
    labels = [method]
    for _ in range(n - 1):
        draw = {k: v * spread ** rng.uniform(-1, 1) for k, v in keys.items()}
        labels.append(method + "".join(f"@{k}={fmt(v)}" for k, v in draw.items()))
    return labels


def score(rows: list[dict], label: str, metric: str) -> float | None:
    """The label's mean `aligned_<metric>` over its trial seeds, signed so that higher is better."""
    values = [r.get(f"aligned_{metric}") for r in rows if r["method"] == label and "failed" not in r]
    values = [v for v in values if v is not None]
    if not values or len(values) < sum(r["method"] == label for r in rows):  # a diverged seed disqualifies
        return None
    mean = float(np.mean(values))
    return -mean if metric in LOWER_IS_BETTER else mean


def run_tune(suite: str, out, methods: list[str], trials_per_method: int = 8, seeds: int = 5, trial_seeds: int = 1,
             metric: str | None = None, budget=None, per_prompt=None, configs="configs", overrides=(),
             spread: float = 10.0, command: str | None = None, **bench) -> dict:
    """Tune every method on the validation split, then run the chosen settings on fresh seeds."""
    from .suite import run_bench

    if not methods:
        raise ValueError("bench tune needs --methods (the methods to tune and compare)")
    metric = metric or default_metric(suite)
    out = Path(out)
    keys = {m: space(suite, m, configs, overrides) for m in methods}
    labels = {m: trials(m, keys[m], trials_per_method, spread) for m in methods}
    tried = run_bench(suite, out / "trials", methods=[lab for m in methods for lab in labels[m]], seeds=trial_seeds,
                      budget=budget, per_prompt=per_prompt, configs=configs, command=command,
                      overrides=[*overrides, f"eval.seed={VALIDATION_EVAL_SEED}"], first_seed=TRIAL_SEED, **bench)
    chosen = {}
    for m in methods:
        scored = [(s, lab) for lab in labels[m] if (s := score(tried["rows"], lab, metric)) is not None]
        if not scored:
            raise RuntimeError(f"every trial of {m} diverged or has no '{metric}': widen nothing, lower --spread")
        chosen[m] = max(scored)[1]
    tuning = {"trials": trials_per_method, "trial_seeds": trial_seeds, "metric": metric, "spread": spread,
              "keys": {m: list(k) for m, k in keys.items()}, "chosen": chosen,
              "validation": f"training seeds {TRIAL_SEED}.., eval.seed {VALIDATION_EVAL_SEED}"}
    final = run_bench(suite, out / "final", methods=[chosen[m] for m in methods], seeds=seeds, budget=budget,
                      per_prompt=per_prompt, configs=configs, command=command, overrides=list(overrides),
                      reference=chosen[methods[0]], tuning=tuning, **bench)
    checkpoint.atomic_write_text(out / "tune.json", json.dumps(tuning, indent=1))
    checkpoint.atomic_write_text(out / "tune.md", trial_table(tried["rows"], labels, chosen, metric))
    return {"tuning": tuning, "trials": tried, "final": final}


def trial_table(rows: list[dict], labels: dict, chosen: dict, metric: str) -> str:
    lines = [f"# Trials (validation split), by {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""),
             "", "| method | trial | settings | " + metric + " | chosen |", "|---|---:|---|---:|---|"]
    for m, labs in labels.items():
        for i, lab in enumerate(labs):
            s = score(rows, lab, metric)
            value = "diverged" if s is None else f"{(-s if metric in LOWER_IS_BETTER else s):.4f}"
            lines.append(f"| {m} | {i} | {lab.partition('@')[2].replace('@', ', ') or 'as shipped'} | {value} | "
                         f"{'✓' if chosen[m] == lab else ''} |")
    return "\n".join(lines) + "\n"
