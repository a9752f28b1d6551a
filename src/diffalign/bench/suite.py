"""`diffalign bench suite`: every method at the same budget of reward queries, over seeds.

Each (method, seed) cell is an ordinary training run in OUT/runs/<method>/seed-<s>,
made from `configs/<method>_<suite>.yaml` with the seed, the budget
(`train.reward_budget`) and the evaluation size set by the bench. Online methods stop
before an epoch would pass the budget; offline methods (Diffusion-DPO/KTO, DDO-DPO/KTO)
learn from a feedback set whose construction costs the budget, built once per seed from
base samples scored by the training reward and shared by them. `feedback` (`--feedback`,
part of the bench's settings) is its regime:

- `paired` (default): budget / 2 pairs ranked by the reward, in OUT/data/seed-<s>; every
  offline method reads them (Diffusion-KTO labels their images by the Pick-a-Pic rule).
- `unpaired`: budget images, each labelled alone: desirable when its reward is above its
  prompt's median (`feedback.make_labels`), in OUT/data/unpaired/seed-<s>. A method that
  reads labels (`offline_data = "labels"`: Diffusion-KTO, DDO-KTO) learns from them; one that
  reads pairs, from the pairs the labels form without rewards (each desirable image with one
  undesirable image of its prompt: budget / 2 pairs; `feedback.pairs_from_labels`).
- `imbalanced`: the same with the top quarter of each prompt's rewards desirable (1 : 3, the
  ratio of Pick-a-Pic's labels reported by Diffusion-KTO), in OUT/data/imbalanced/seed-<s>;
  budget / 4 pairs.

A method may be a variant: `name@key=value@key=value` is the config `name` with those
overrides (e.g. `nabla-gfn@args.beta=3`), reported under that label, so one command
gives a method at several settings (a reward-vs-diversity front).

`overrides` (`--set key=value`, repeatable) apply to every cell, before a variant's own:
e.g. `--set model=/models/stable-diffusion-v1-5 --set prompts=animals --set reward=...`
runs the suite's methods on a pipeline folder. They are part of the bench's settings: a
bench folder never mixes cells run with different ones.

Resumable: a cell with summary.json is read, not rerun; an interrupted cell resumes
from its newest checkpoint. results.json is rewritten after every cell; report.md and
the figures are written at the end (`report.write_report`).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .. import checkpoint
from ..eval.core import as_baseline


@dataclass
class Suite:
    model: str
    methods: list[str]
    budget: int  # reward queries per cell
    seeds: int
    per_prompt: int  # evaluation samples per prompt (fixed seeds, base and aligned alike)
    quick: dict = field(default_factory=dict)  # what --quick changes
    bt_noise: float | None = None  # offline methods' pairs: Bradley–Terry labels at this temperature (None: the max wins)
    base_row: bool = True  # report the base model (False: runs from scratch, whose base is a random init)
    classes: list[int] = field(default_factory=list)  # classes whose sample share the report tabulates
    configs: str | None = None  # config suite for methods without a `<method>_<suite>.yaml` of their own
    overrides: list[str] = field(default_factory=list)  # applied to cells whose config is borrowed (`configs`)
    eval_every: int = 0  # epochs between evaluations of every cell (the race table's curves; 0 = start and end)


def likelihood_methods() -> list[str]:
    """Every registered method that trains through step log-probabilities: they run on flow-matching models
    through the flow SDE. GRPO (made for flow models) first."""
    from ..methods import get_method, list_methods

    return sorted((n for n, _ in list_methods() if get_method(n).requires_logprob), key=lambda n: n != "grpo")


FORWARD_METHODS = ["nft", "awm"]  # forward-process RL: no likelihoods, any sampler (configs of their own per suite)
FLOW_METHODS = likelihood_methods() + FORWARD_METHODS + ["adjoint-matching"]

SUITES = {
    "digits": Suite("digits", ["ddpo", "d3po", "spo", "tailorpo", "tailorpo-g", "diffusion-dpo", "diffusion-kto",
                               "nabla-gfn", "alignprop", "draft", "refl", "dpok", *FORWARD_METHODS, "adjoint-matching", "ddo"],
                    budget=2048, seeds=3, per_prompt=20, eval_every=2,
                    quick={"seeds": 1, "budget": 512}),
    "toy2d": Suite("toy2d", ["ddpo", "d3po", "spo", "tailorpo", "tailorpo-g", "nabla-gfn", "alignprop", "draft", "refl",
                             "dpok", "ddo", "ddo-dpo", "diffusion-dpo", "diffusion-kto", "adjoint-matching"], budget=4096, seeds=3, per_prompt=1000,
                   quick={"seeds": 1, "budget": 2048}, bt_noise=1.0),  # BT pairs at temperature 1: DPO's own optimum (no KL term) is p*
    # flow-matching models: every likelihood method, on the DDIM suite's configs with the model swapped and
    # the SDE's noise level set (Flow-GRPO's a = 0.7); GRPO has configs of its own
    "digits-flow": Suite("digits-flow", FLOW_METHODS,
                         budget=2048, seeds=3, per_prompt=20, quick={"seeds": 1, "budget": 512}, configs="digits",
                         eval_every=2,
                         overrides=["model=digits-flow", "sampling.eta=0.7"]),
    "toy2d-flow": Suite("toy2d-flow", FLOW_METHODS,
                        budget=4096, seeds=3, per_prompt=1000, quick={"seeds": 1, "budget": 2048}, configs="toy2d",
                        eval_every=4,
                        overrides=["model=toy2d-flow", "sampling.eta=0.7"]),
    # budget 0: no reward is queried; every row trains its config's steps on the same data (constrained training)
    "digits-minority": Suite("digits", ["unconstrained", "constrained", "constrained-resilient"], budget=0, seeds=3,
                             per_prompt=1000, quick={"seeds": 1}, base_row=False, classes=[4, 5, 7]),
    # DDO's orientation experiment: the base is trained on rotated digits; the pairs prefer the less-rotated image
    # (ranked by the configs' `upright` reward, the angle judge); scripts/orientation.py measures the angles
    "digits-rotated": Suite("digits-rotated", ["ddo-dpo", "diffusion-dpo", "ddpo"], budget=2048, seeds=3, per_prompt=20,
                            quick={"seeds": 1, "budget": 512}),
}

METRICS = ["reward_mean", "eval_reward_mean", "reward_accuracy", "eval_reward_accuracy", "diversity", "diversity_rel",
           "frechet", "frechet_real", "class_histogram", "win_rate", "eval_win_rate", "kl", "optimum_distance",
           "optimum_distance_sd", "optimum_floor", "optimum_ratio", "optimum_beta", "data_distance", "data_floor",
           "data_ratio"]


def variant(label: str) -> tuple[str, list[str]]:
    """'name@key=value@...' -> (config name, overrides)."""
    name, *overrides = label.split("@")
    bad = [o for o in overrides if "=" not in o]
    if bad or not name:
        raise ValueError(f"method variant {label!r}: write it as name@key=value (e.g. nabla-gfn@args.beta=3)")
    return name, overrides


def config_path(configs: Path, name: str, suite: str) -> Path:
    name = variant(name)[0]
    suites = [suite] + ([SUITES[suite].configs] if suite in SUITES and SUITES[suite].configs else [])
    spellings = lambda x: dict.fromkeys((x, x.replace("-", "_")))  # noqa: E731
    tries = [Path(configs) / f"{n}_{s}.yaml" for one in suites for n in spellings(name) for s in spellings(one)]
    path = next((t for t in tries if t.exists()), tries[-1])
    if not path.exists():
        have = sorted(p.stem[: -len(suite) - 1] for p in Path(configs).glob(f"*_{suite.replace('-', '_')}.yaml"))
        raise FileNotFoundError(f"no config for method '{name}' in suite '{suite}' ({path} is missing); "
                                f"configs for {suite}: {', '.join(have) or 'none'} (or pass --configs DIR)")
    return path


def plan(suite: str, methods=None, seeds=None, budget=None, quick=False, per_prompt=None, overrides=(),
         first_seed: int = 0, feedback: str = "paired") -> dict:
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}': available: {', '.join(SUITES)}")
    if feedback not in FEEDBACK:
        raise ValueError(f"unknown feedback regime '{feedback}': available: {', '.join(FEEDBACK)}")
    s = SUITES[suite]
    q = s.quick if quick else {}
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), s.model)
    return {"suite": suite, "model": model,
            "methods": list(methods or q.get("methods", s.methods)),
            "seeds": int(seeds or q.get("seeds", s.seeds)), "first_seed": int(first_seed),
            "budget": int(budget or q.get("budget", s.budget)),
            "per_prompt": int(per_prompt or q.get("per_prompt", s.per_prompt)),
            "quick": bool(quick), "base_row": s.base_row, "classes": list(s.classes), "overrides": list(overrides),
            "feedback": feedback}


def run_bench(suite: str, out: str | Path, methods=None, seeds=None, budget=None, quick=False, per_prompt=None,
              configs: str | Path = "configs", command: str | None = None, overrides=(), first_seed: int = 0,
              reference: str | None = None, tuning: dict | None = None, feedback: str = "paired") -> dict:
    """Run (or resume) every cell of the plan; return results (also OUT/results.json). Seeds run from
    `first_seed` (`bench tune` runs its trials on seeds the final comparison does not use); `reference`
    names the row the report's paired-difference table compares every other method with; `tuning` is
    `bench tune`'s record of how the rows' settings were chosen (the report states it); `feedback` is the
    offline methods' feedback regime (paired, unpaired or imbalanced: see the module docstring)."""
    from ..train import resolve_config
    from .report import write_report

    p = plan(suite, methods, seeds, budget, quick, per_prompt, overrides, first_seed, feedback)
    out = Path(out)
    if p["budget"] < 1 and SUITES[suite].budget > 0:
        raise ValueError("--budget must be a positive number of reward queries")
    for name in p["methods"]:  # every config is valid before anything runs
        resolve_config(config_path(configs, name, suite), _overrides(p, 0, offline=False)[:2] + cell_overrides(p, name, configs))
    settings = out / "bench.json"
    if settings.exists():
        prev = json.loads(settings.read_text())
        for key, default in (("suite", None), ("budget", None), ("per_prompt", None), ("overrides", []),
                             ("first_seed", 0), ("feedback", "paired")):
            if prev.get(key, default) != p[key]:
                raise ValueError(f"{out} holds a bench with {key} = {prev.get(key, default)}, not {p[key]}: "
                                 "choose another --out (results at different settings must not mix)")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(settings, json.dumps(p, indent=1))
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    started = old.get("started", time.strftime("%Y-%m-%d %H:%M:%S"))  # a resumed bench keeps its start time
    results = {**p, "command": command or " ".join(sys.argv), "machine": _machine(), "started": started, "rows": [],
               "reference": reference or old.get("reference"), "tuning": tuning or old.get("tuning")}
    seeds = range(p["first_seed"], p["first_seed"] + p["seeds"])
    cells = [(m, s) for m in p["methods"] for s in seeds]
    done_before = all((out / "runs" / m / f"seed-{s}" / "summary.json").exists() for m, s in cells)
    bar = tqdm(cells, desc=f"bench {suite}", unit="cell")
    for name, seed in bar:
        bar.set_postfix(method=name, seed=seed)
        results["rows"].append(run_cell(p, out, name, seed, Path(configs)))
        checkpoint.atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    # rerunning a finished bench only rewrites the report: it keeps the original finish time
    results["finished"] = old["finished"] if done_before and "finished" in old else time.strftime("%Y-%m-%d %H:%M:%S")
    checkpoint.atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    write_report(out, results)
    return results


def cell_overrides(p: dict, name: str, configs: str | Path = "configs") -> list[str]:
    """The suite's own overrides (for a config borrowed from another suite; a method's own config for
    this suite is taken as written), the bench's `--set` overrides, then the method variant's own."""
    suite = SUITES.get(p.get("suite"))
    borrowed = suite is not None and bool(suite.configs) and not config_path(
        Path(configs), name, p["suite"]).stem.endswith(p["suite"].replace("-", "_"))
    every = [f"eval.every={suite.eval_every}"] if suite is not None and suite.eval_every else []
    return every + (list(suite.overrides) if borrowed else []) + list(p.get("overrides", [])) + variant(name)[1]


def _overrides(p: dict, seed: int, offline: bool) -> list[str]:
    o = [f"seed={seed}", f"eval.per_prompt={p['per_prompt']}", "train.keep_checkpoints=1"]
    if not offline and p["budget"] > 0:  # the budget ends training; the epoch count only caps it
        o += [f"train.reward_budget={p['budget']}", "train.epochs=1000000"]
    return o


def run_cell(p: dict, out: Path, name: str, seed: int, configs: Path) -> dict:
    from ..methods import get_method
    from ..rewards import RewardError
    from ..run_folder import holds_run, open_run
    from ..train import resolve_config, train

    run = out / "runs" / name / f"seed-{seed}"
    cfg, args = resolve_config(config_path(configs, name, p["suite"]), cell_overrides(p, name, configs))
    offline = getattr(get_method(cfg.method), "offline_data", False)
    data = ensure_feedback(p, out, seed, cfg, reads=offline) if offline else None
    if (run / "failed.json").exists():
        return failed_row(name, seed, run, cfg.method)
    folder = open_run(run) if holds_run(run) else None
    if folder is None or not folder.finished:
        try:
            if folder is not None:  # interrupted: resume it
                cfg, args = folder.config()
                train(cfg, args, run, resume=True)
            else:
                extra = [f"args.data={data['path']}"] if data else []
                cfg, args = resolve_config(config_path(configs, name, p["suite"]),
                                           _overrides(p, seed, offline) + extra + cell_overrides(p, name, configs))
                train(cfg, args, run)
        except (FloatingPointError, RewardError) as e:  # a setting that diverges is a result, not the end
            if isinstance(e, RewardError) and "images themselves contain NaN/inf" not in str(e):
                raise  # the reward's own fault, not the model's
            run.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(run / "failed.json", json.dumps({"error": str(e)}))
            return failed_row(name, seed, run, cfg.method)
    row = make_row(name, seed, run, data)
    return {**row, "feedback": data["feedback"]} if data else row


def failed_row(name: str, seed: int, run: Path, algorithm: str) -> dict:
    """The row of a run that diverged: no metrics, the error kept (the report counts it)."""
    error = json.loads((run / "failed.json").read_text())["error"]
    return {"method": name, "algorithm": algorithm, "seed": seed, "run": str(run), "failed": error,
            "reward_queries": None, "wall_s": None, "epochs": None, "offline": False, "curve": []}


FEEDBACK = {"paired": None, "unpaired": 0.5, "imbalanced": 0.25}  # regime -> share of desirable images per prompt


def ensure_feedback(p: dict, out: Path, seed: int, cfg, reads="pairs") -> dict:
    """The offline methods' feedback for one seed, built once and shared (see the module docstring):
    paired (budget / 2 pairs of base samples ranked by the training reward), or unpaired / imbalanced
    (budget base samples labelled alone, and the pairs their labels form). Returns the file for a
    method that `reads` "labels" or "pairs" (every method gets the pairs in the paired regime, as
    before the regimes existed), the data's cost and its counts (`feedback`, for the report)."""
    from ..data import feedback
    from ..data.prompts import resolve_prompts
    from ..models import load_model
    from ..rewards import build_reward
    from ..sampler import Sampler

    regime = p.get("feedback", "paired")
    fraction = FEEDBACK[regime]
    folder = out / "data" / (f"seed-{seed}" if fraction is None else f"{regime}/seed-{seed}")
    stats_path = folder / "stats.json"
    if not stats_path.exists():
        start = time.time()
        model = load_model(cfg.model)
        reward, prompts = build_reward(cfg.reward), resolve_prompts(cfg.prompts, model.prompts)
        sampler = Sampler.from_config(cfg.sampling, model)
        with checkpoint.atomic_dir(folder) as tmp:
            if fraction is None:
                stats = feedback.make_pairs(model, reward, prompts, p["budget"] // 2, tmp, seed=1000 + seed,
                                            sampler=sampler, bt_noise=SUITES[p["suite"]].bt_noise)
                stats.update(reward_queries=2 * (p["budget"] // 2))
            else:
                stats = feedback.make_labels(model, reward, prompts, p["budget"], tmp, seed=1000 + seed,
                                             desirable_fraction=fraction, sampler=sampler)
                stats.update(feedback.pairs_from_labels(tmp / "labels.jsonl", tmp)[1], reward_queries=p["budget"])
            stats.update(wall_s=round(time.time() - start, 2))
            stats.pop("path", None)  # the temporary folder's: the files are the folder's own
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    stats = json.loads(stats_path.read_text())
    file = "labels" if fraction is not None and reads == "labels" else "pairs"
    return {"path": str(folder.resolve() / f"{file}.jsonl"), "wall_s": stats["wall_s"],
            "reward_queries": stats["reward_queries"], "feedback": feedback_counts(regime, file, stats)}


def feedback_counts(regime: str, file: str, stats: dict) -> dict:
    """What an offline cell learned from: the regime, the file it read and the set's counts. In the
    paired regime every image is in one pair, so the Pick-a-Pic rule makes each untied pair's winner
    desirable and its loser undesirable."""
    if regime == "paired":
        n = stats["pairs"] - stats["ties"]
        return {"regime": regime, "file": file, "images": 2 * n, "desirable": n, "undesirable": n, "pairs": n}
    return {"regime": regime, "file": file, **{k: stats[k] for k in ("images", "desirable", "undesirable", "pairs")}}


def make_row(name: str, seed: int, run: Path, data: dict | None) -> dict:
    from ..run_folder import open_run

    s = open_run(run, finished=True).summary
    row = {"method": name, "algorithm": s.method, "seed": seed, "run": str(run),
           "reward_queries": s.reward_queries + (data["reward_queries"] if data else 0),
           "wall_s": round(s.wall_s + (data["wall_s"] if data else 0.0), 2),
           "epochs": s.epochs, "offline": data is not None}
    for prefix, e in (("base", as_baseline(s.base)), ("aligned", s.aligned)):
        for key in METRICS:
            row[f"{prefix}_{key}"] = e.get(key)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row["curve"] = [[m["reward_queries"], m["reward_mean"], m.get("wall_s")] for m in metrics if "reward_mean" in m]
    row["eval_curve"] = eval_curve(s, metrics)
    dual = [[m["epoch"] + 1, {k[3:]: v for k, v in m.items() if k.startswith("mu_")}] for m in metrics]
    if any(d for _, d in dual):  # constrained training: the multipliers per epoch
        row["mu_curve"] = dual
    return row


def eval_curve(summary, metrics: list[dict]) -> list[list]:
    """[reward queries, evaluation-set reward, wall s] from the base (0 queries) through the periodic
    evaluations (`eval.every`) to the final model: the held-out reward where the run has one."""
    held = summary.aligned.get("eval_reward_mean") is not None
    key = "eval_reward_mean" if held else "reward_mean"
    base = as_baseline(summary.base)
    points = [[0, base.get(key), 0.0]]
    points += [[m["reward_queries"], m[f"eval_{key}"], m.get("wall_s")] for m in metrics if f"eval_{key}" in m]
    return points + [[summary.reward_queries, summary.aligned.get(key), summary.wall_s]]


def _machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}


__all__ = ["SUITES", "Suite", "plan", "run_bench"]
