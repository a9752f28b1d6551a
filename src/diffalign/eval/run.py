"""`diffalign eval RUN_DIR`: base and aligned model of a run, side by side, on fixed seeds."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import checkpoint
from .core import as_baseline, compare, evaluate


def evaluate_run(run_dir: str | Path, per_prompt: int | None = None, seed: int | None = None,
                 write: bool = True, base: dict | None = None, n: int | None = None) -> dict:
    """Evaluate the newest checkpoint of the run in `run_dir` against its base model.

    Both models sample the same prompts from the same noise (`seed`, default the run's
    eval.seed); `per_prompt` samples per prompt (default the run's eval.per_prompt), or
    `n` samples in all (rounded up to the same number for every prompt, at least 2).
    `base` reuses an earlier base evaluation with the same settings. Writes eval.json."""
    if n is not None and per_prompt is not None:
        raise ValueError("give either n (total samples) or per_prompt, not both")
    from ..train import Trainer, resolve_config

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml): pass the --out folder of `diffalign train`")
    ckpt = checkpoint.latest(run / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet: train (or resume) it for at least one epoch")
    cfg, args = resolve_config(run / "config.yaml")
    t = Trainer(cfg, args, run, build_method=False)
    from .. import adapters

    if not t.has_reference:  # full fine-tuning: the base is the weights before the checkpoint is loaded
        import copy

        t.ref_denoiser = copy.deepcopy(adapters.unwrap(t.policy.denoiser)).requires_grad_(False).eval()

    state = checkpoint.load(ckpt, adapters.unwrap(t.policy.denoiser), None)
    start = time.time()
    if n is not None:
        per_prompt = max(2, -(-n // len(t.prompts)))
    per_prompt = per_prompt or cfg.eval.per_prompt
    seed = cfg.eval.seed if seed is None else seed
    if base is None:
        with t.reference():
            base = as_baseline(evaluate(t.model, t, per_prompt=per_prompt, seed=seed))
    aligned = evaluate(t.model, t, per_prompt=per_prompt, seed=seed, kl=True)
    aligned.update(compare(base, aligned))
    result = {"run": str(run), "method": cfg.method, "model": cfg.model, "reward": t.reward.name,
              "eval_reward": t.eval_reward.name if t.eval_reward else None, "checkpoint": ckpt.name,
              "epoch": state["epoch"], "reward_queries": state["reward_queries"], "wall_s": state.get("wall_s"),
              "per_prompt": per_prompt, "seed": seed, "eval_s": round(time.time() - start, 2),
              "base": base, "aligned": aligned}
    if write:
        checkpoint.atomic_write_text(run / "eval.json", json.dumps(result, indent=1))
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
