"""`diffalign bench step`: the cost of a method's training update beyond the model itself.

For each method (its `configs/<method>_<suite>.yaml`, at 16 samples of one batch so every
method is timed on the same footing): collect one batch (not timed), then time, side by
side in one process and interleaved over `repeats` rounds (medians):

- `update`: every micro-step of the batch with its optimizer steps (`Trainer.update`);
- `loss`: the same without optimizer steps (forward through the method's losses + backward);
- `bare`: a bare forward + backward of the same denoiser on exactly the inputs the update
  gave it (every call recorded by a forward hook: the same batch, timesteps and conditions),
  one backward per micro-step as in the update.

`loss / bare` is the overhead of the loss code (log-probs, the loss, bookkeeping): the
target is <= 1.2x. `update / bare` adds the optimizer. Model calls are counted, so a
method that calls the model more often than the bare replay would show it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

SMALL = ["train.batch_size=16", "train.batches_per_epoch=1", "eval.reward=null"]


def _record_calls(trainer, batch) -> list[list[tuple]]:
    """Run every micro-step once (with its optimizer steps) and record, per micro-step, the
    denoiser's inputs (args, kwargs), detached."""
    den, calls = trainer.run.model.denoiser, []
    detach = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731

    def hook(module, args, kwargs):
        calls[-1].append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))

    handle = den.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        trainer.set_training(True)
        for micro in trainer.method.micro_steps(batch):
            calls.append([])
            trainer.backward(micro)
    finally:
        handle.remove()
    return calls


def _bare(trainer, calls) -> None:
    den = trainer.run.model.denoiser
    for micro_calls in calls:
        if not micro_calls:
            continue
        total = 0.0
        for args, kwargs in micro_calls:
            out = den(*args, **kwargs)
            out = getattr(out, "sample", out)
            total = total + out.float().mean()
        total.backward()
    trainer.optimizer.zero_grad(set_to_none=True)


def time_method(config: Path, overrides: list[str], repeats: int, out: Path) -> dict:
    from accelerate.state import AcceleratorState

    from ..methods import resolve_config
    from ..train import Trainer

    AcceleratorState._reset_state(True)
    cfg, args = resolve_config(config, SMALL + overrides)
    trainer = Trainer(cfg, args, out)
    trainer.method.start()
    with torch.no_grad():
        trainer.set_training(False)
        batch, _ = trainer.method.collect(0)
    calls = _record_calls(trainer, batch)  # also warms up
    fns = {"update": lambda: trainer.update(batch), "loss": lambda: trainer.update(batch, step=False),
           "bare": lambda: _bare(trainer, calls)}
    times = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = round(sum(1 / m.accumulate for m in trainer.method.micro_steps(batch)))
    return {"method": cfg.method, "config": str(config), "micro_steps": len(calls), "optimizer_steps": steps,
            "model_calls": sum(len(c) for c in calls), "update_s": med["update"], "loss_s": med["loss"],
            "bare_s": med["bare"], "loss_ratio": med["loss"] / med["bare"], "update_ratio": med["update"] / med["bare"]}


def bench_step(methods=None, configs="configs", suite: str = "digits", repeats: int = 7, out=None) -> dict:
    """Time every method of the suite (or `methods`, config names); returns the rows (and writes
    OUT/step.json if `out` is given)."""
    import json

    from ..data import feedback
    from ..methods import get_method, resolve_config
    from ..models import load_model
    from ..rewards import build_reward
    from ..sampler import Sampler
    from .suite import SUITES, config_path, variant

    names = methods or SUITES[suite].methods
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = None
        for name in names:
            path, overrides = config_path(Path(configs), name, suite), variant(name)[1]
            cfg, _ = resolve_config(path, overrides)
            if getattr(get_method(cfg.method), "offline_data", False):  # a small pairs set of the base model
                if pairs is None:
                    pairs = Path(tmp) / "pairs"
                    model = load_model(SUITES[suite].model, progress=False)
                    feedback.make_pairs(model, build_reward("classifier"), model.prompts, 64, pairs,
                                        sampler=Sampler(num_steps=model.num_inference_steps))
                overrides = overrides + [f"args.data={pairs / 'pairs.jsonl'}"]
            rows.append(time_method(path, overrides, repeats, Path(tmp) / f"run-{len(rows)}"))
    result = {"suite": suite, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "step.json").write_text(json.dumps(result, indent=1))
    return result


def format_step(result: dict) -> str:
    head = "| method | micro-steps | optimizer steps | model calls | bare fwd+bwd (s) | loss (s) | update (s) | loss / bare | update / bare |"
    lines = [head, "|" + "---|" * 9]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['micro_steps']} | {r['optimizer_steps']} | {r['model_calls']} | "
                     f"{r['bare_s']:.3f} | {r['loss_s']:.3f} | {r['update_s']:.3f} | {r['loss_ratio']:.2f}x | "
                     f"{r['update_ratio']:.2f}x |")
    return "\n".join(lines)
