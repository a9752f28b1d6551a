"""`diffalign bench memory`: peak memory of one training update, with and without gradient
checkpointing (issue: AlignProp through the whole sampling chain on digits).

Each variant runs in its own process (`python -m diffalign.bench.memory ...`), so one
does not inherit the other's allocator state. There, after the run is built and one
batch collected, a thread samples the process's resident memory every millisecond
during one update; the result is its peak minus the level just before the update. On a
GPU, `torch.cuda.max_memory_allocated` is reported as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time

import torch


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(config: str, overrides: list[str]) -> dict:
    """Peak resident memory (bytes) of one update of the run `config` + `overrides`, in this process."""
    from ..methods import resolve_config
    from ..train import Trainer

    cfg, args = resolve_config(config, overrides)
    tr = Trainer(cfg, args, tempfile.mkdtemp())
    with torch.no_grad():
        batch, _ = tr.method.collect(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    tr.update(batch)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    out = {"config": config, "overrides": overrides, "rss_before": base, "rss_peak": max(peak[0], _rss()),
           "step_peak_bytes": max(peak[0], _rss()) - base, "seconds": seconds}
    if torch.cuda.is_available():
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def bench_memory(config: str = "configs/alignprop_digits.yaml", grad_steps: int = 20, extra: list[str] = (),
                 toggle: str = "args.checkpoint") -> dict:
    """One update with and without checkpointing, each in a fresh process; gradients through the
    last `grad_steps` sampling steps (20: the whole chain of the digits config). `toggle` is the
    switch: `args.checkpoint` (AlignProp's per-step checkpointing of the sampling chain) or
    `train.gradient_checkpointing` (the UNet's own, for pipeline folders); `extra`: more overrides."""
    rows = []
    for ckpt in (True, False):
        overrides = [f"args.min_grad_steps={grad_steps}", f"args.max_grad_steps={grad_steps}",
                     f"{toggle}={str(ckpt).lower()}", "args.minibatches=1", "train.batches_per_epoch=1", *extra]
        r = subprocess.run([sys.executable, "-m", "diffalign.bench.memory", config, *overrides], capture_output=True,
                           text=True, check=True)
        rows.append({"checkpoint": ckpt, **json.loads(r.stdout.strip().splitlines()[-1])})
    return {"toggle": toggle, "rows": rows, "ratio": rows[1]["step_peak_bytes"] / max(1, rows[0]["step_peak_bytes"])}


def format_memory(result: dict) -> str:
    lines = [f"| {result.get('toggle', 'args.checkpoint')} | peak memory of one update (MB) | seconds |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {'on' if r['checkpoint'] else 'off'} | {r['step_peak_bytes'] / 2**20:.0f} | {r['seconds']:.2f} |")
    lines.append(f"without / with checkpointing: {result['ratio']:.1f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2:])))
