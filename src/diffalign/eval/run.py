"""`diffalign eval RUN_DIR`: base and aligned model of a run, side by side, on fixed seeds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint
from .core import as_baseline, compare, evaluate


@dataclass
class LoadedRun:
    """A run folder's config, context, method and newest weights, ready to sample."""

    folder: Path
    cfg: object
    run: object  # diffalign.context.Run
    method: object
    sampler: object  # the aligned model's sampler
    checkpoint: Path
    state: dict


def load_run(run_dir: str | Path, finished: bool = False) -> LoadedRun:
    """Build a run's context and method, and load its newest checkpoint into every module.

    The reference stays available: LoRA runs switch adapters off, full fine-tunes keep a
    copy of the base weights taken before the checkpoint is loaded. `finished=True`
    refuses a run that has not finished training."""
    from ..context import Run
    from ..methods import build, modules_of, resolve_config, sampler_of

    folder = Path(run_dir)
    if not (folder / "config.yaml").exists():
        raise FileNotFoundError(f"{folder} is not a run folder (no config.yaml): pass the --out folder of "
                                "`diffalign train`")
    ckpt = checkpoint.latest(folder / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{folder} has no checkpoint yet: train (or resume) it for at least one epoch")
    if finished and not (folder / "summary.json").exists():
        raise FileNotFoundError(f"{folder} has not finished training (newest checkpoint {ckpt.name}): resume it with "
                                f"`diffalign train --resume {folder}`")
    cfg, args = resolve_config(folder / "config.yaml")
    run = Run(cfg, out=folder, keep_reference=True)
    method = build(run, args)
    modules = {n: tr.module.to(run.device) for n, tr in modules_of(method, run).items()}
    state, method_state = checkpoint.load(ckpt, modules, None)
    if hasattr(method, "load_state_dict"):
        method.load_state_dict(method_state)
    for m in modules.values():
        m.eval()
    return LoadedRun(folder, cfg, run, method, sampler_of(method, run), ckpt, state)


def evaluate_run(run_dir: str | Path, per_prompt: int | None = None, seed: int | None = None,
                 write: bool = True, base: dict | None = None, n: int | None = None) -> dict:
    """Evaluate the newest checkpoint of the run in `run_dir` against its base model.

    The aligned model is the run's weights sampled by its method's sampler; the base is the
    reference sampled plainly. Both sample the same prompts from the same noise (`seed`,
    default the run's eval.seed); `per_prompt` samples per prompt (default the run's
    eval.per_prompt), or `n` samples in all (rounded up to the same number for every prompt,
    at least 2). `base` reuses an earlier base evaluation with the same settings. Writes eval.json."""
    if n is not None and per_prompt is not None:
        raise ValueError("give either n (total samples) or per_prompt, not both")
    loaded = load_run(run_dir)
    r, cfg = loaded.run, loaded.cfg
    start = time.time()
    if n is not None:
        per_prompt = max(2, -(-n // len(r.prompts)))
    per_prompt = per_prompt or cfg.eval.per_prompt
    seed = cfg.eval.seed if seed is None else seed
    if base is None:
        with r.reference():
            base = as_baseline(evaluate(r, r.sampler, per_prompt=per_prompt, seed=seed))
    aligned = evaluate(r, loaded.sampler, per_prompt=per_prompt, seed=seed, kl=True)
    aligned.update(compare(base, aligned))
    result = {"run": str(loaded.folder), "method": cfg.method, "model": cfg.model, "reward": r.reward.name,
              "eval_reward": r.eval_reward.name if r.eval_reward else None, "checkpoint": loaded.checkpoint.name,
              "epoch": loaded.state["epoch"], "reward_queries": loaded.state["reward_queries"], "wall_s": loaded.state.get("wall_s"),
              "per_prompt": per_prompt, "seed": seed, "eval_s": round(time.time() - start, 2),
              "base": base, "aligned": aligned}
    if write:
        checkpoint.atomic_write_text(loaded.folder / "eval.json", json.dumps(result, indent=1))
    return result


ROWS = [("reward_mean", "training reward"), ("eval_reward_mean", "held-out reward"), ("win_rate", "win rate vs base"),
        ("diversity", "diversity"), ("frechet", "Fréchet distance"), ("kl", "KL to reference (nats)"),
        ("optimum_distance", "distance to p*")]


def format_eval(result: dict) -> str:
    """A two-column text table (base, aligned) of the headline metrics."""
    b, a = result["base"], result["aligned"]
    rows = [("", "base", "aligned")]
    for key, label in ROWS:
        if a.get(key) is not None:
            f = lambda v: "-" if v is None else f"{v:.4g}"
            rows.append((label, f(b.get(key)), f(a.get(key))))
    if a.get("frechet_real") is not None:
        rows.append(("Fréchet distance, same-size real sample", "", f"{a['frechet_real']:.4g}"))
    if a.get("optimum_floor") is not None:
        rows.append(("floor of distance to p*", "", f"{a['optimum_floor']:.4g}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append(f"{result['method']} on {result['model']}, {result['checkpoint']}: {result['reward_queries']} reward "
                 f"queries; {result['per_prompt']} samples per prompt, seed {result['seed']}")
    return "\n".join(lines)
