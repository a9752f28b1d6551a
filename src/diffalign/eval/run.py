"""`diffalign eval RUN_DIR`: base and aligned model of a run, side by side, on fixed seeds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint
from .core import as_baseline, compare, evaluate
from .results import EvalResult, write_result


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
    """Open the run folder (`run_folder.open_run`), build its context and method, and load its
    newest checkpoint into every module.

    The reference stays available: LoRA runs switch adapters off, full fine-tunes keep a
    copy of the base weights taken before the checkpoint is loaded. `finished=True`
    refuses a run that has not finished training."""
    from ..context import Run
    from ..methods import build, modules_of, sampler_of
    from ..run_folder import open_run

    folder = open_run(run_dir, checkpoint_needed=True, finished=finished)
    cfg, args = folder.config()
    run = Run(cfg, out=folder.folder, keep_reference=True)
    method = build(run, args)
    modules = {n: tr.module.to(run.device) for n, tr in modules_of(method, run).items()}
    state, method_state = checkpoint.load(folder.checkpoint, modules, None)
    method.load_state_dict(method_state)
    for m in modules.values():
        m.eval()
    return LoadedRun(folder.folder, cfg, run, method, sampler_of(method, run), folder.checkpoint, state)


def evaluate_run(run_dir: str | Path, per_prompt: int | None = None, seed: int | None = None,
                 write: bool = True, base: dict | None = None, n: int | None = None) -> dict:
    """Evaluate the newest checkpoint of the run in `run_dir` against its base model.

    The aligned model is the run's weights sampled by its method's sampler; the base is the
    reference sampled plainly. Both sample the same prompts from the same noise (`seed`,
    default the run's eval.seed); `per_prompt` samples per prompt (default the run's
    eval.per_prompt), or `n` samples in all (rounded up to the same number for every prompt,
    at least 2). `base` reuses an earlier base evaluation with the same settings. Writes eval.json and
    returns its content (`EvalResult.to_json()`)."""
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
    result = EvalResult(method=cfg.method, model=cfg.model, reward=r.reward.name,
                        eval_reward=r.eval_reward.name if r.eval_reward else None, base=base, aligned=aligned,
                        reward_queries=loaded.state["reward_queries"], wall_s=loaded.state.get("wall_s"),
                        run=str(loaded.folder), checkpoint=loaded.checkpoint.name, epoch=loaded.state["epoch"],
                        per_prompt=per_prompt, seed=seed, eval_s=round(time.time() - start, 2))
    if write:
        write_result(loaded.folder, result)
    return result.to_json()
