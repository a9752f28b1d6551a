"""`diffalign bench memory`: peak memory of one training update, with and without gradient
checkpointing (issue: AlignProp through the whole sampling chain on digits); with `--sharding`,
the bytes each process holds of the trained parameters, their gradients and the AdamW state,
for 1 and more processes, unsharded and with `train.sharding: fsdp` (`bench_sharding`).

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


def measure_state(config: str, overrides: list[str]) -> dict | None:
    """Per-process bytes of trained parameters, gradients (after the first optimizer step's
    backward passes) and optimizer state (after that step), for a full fine-tune; every process of a
    torchrun launch calls this, the main one returns {"processes": [...per process...]}."""
    from ..methods import resolve_config
    from ..sharding import local_bytes
    from ..train import Trainer

    cfg, args = resolve_config(config, overrides)
    tr = Trainer(cfg, args, tempfile.mkdtemp())
    with torch.no_grad():
        batch, _ = tr.method.collect(0)
    tr.set_training(True)
    params = [p for ps in tr.params.values() for p in ps]
    micros = iter(tr.method.micro_steps(batch))
    first = next(micros)
    for micro in [first] + [next(micros) for _ in range(first.accumulate - 1)]:
        tr.backward(micro)
    grads = local_bytes([p.grad for p in params])
    tr.optimizer_step()
    adam = local_bytes([v for s in tr.optimizer.state.values() for v in s.values() if torch.is_tensor(v)])
    whole = local_bytes([p for part in tr.run.model.parts.values() for p in part.parameters()])
    every = tr.run.dist.gather(torch.tensor([[local_bytes(params), grads, adam, whole]],
                                            dtype=torch.float64)).tolist()
    tr.acc.wait_for_everyone()
    if tr.run.processes > 1:
        torch.distributed.destroy_process_group()
    return {"processes": [dict(zip(("parameters", "gradients", "optimizer", "frozen_whole"), map(int, row)))
                          for row in every],
            "sharded": bool(tr.sharded)} if tr.run.dist.is_main else None


def bench_sharding(configs: dict[str, tuple[str, list[str]]], processes: tuple[int, ...] = (1, 2)) -> dict:
    """For each named (config, overrides): one process unsharded, then each count in `processes`
    (> 1) unsharded and with `train.sharding: fsdp`, each launched apart (torchrun)."""
    rows = []
    for name, (config, overrides) in configs.items():
        for n in processes:
            for mode in (("none",) if n == 1 else ("none", "fsdp")):
                args = [config, *overrides, f"train.sharding={mode}", f"train.batch_size={2 * max(processes)}"]
                cmd = ([sys.executable] if n == 1 else
                       [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                        "127.0.0.1", "--master_port", str(_free_port())])
                r = subprocess.run([*cmd, "-m", "diffalign.bench.memory", "--state", *args], capture_output=True,
                                   text=True)
                if r.returncode:
                    raise RuntimeError(f"bench memory --sharding ({name}, {n} processes, {mode}) failed:\n"
                                       f"{r.stderr[-3000:]}")
                result = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append({"model": name, "processes": n, "sharding": mode, **_worst(result["processes"])})
    for row in rows:
        one = next(r for r in rows if r["model"] == row["model"] and r["processes"] == 1)
        row["vs_one_process"] = row["total"] / one["total"]
    return {"rows": rows}


def _worst(per_process: list[dict]) -> dict:
    """The process holding the most trained state (shards can differ by padding)."""
    def trained(d):
        return d["parameters"] + d["gradients"] + d["optimizer"]

    worst = max(per_process, key=trained)
    return {**worst, "total": trained(worst)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_sharding(result: dict) -> str:
    lines = ["| model | processes | sharding | parameters (MB) | gradients (MB) | AdamW state (MB) | total per process (MB) "
             "| vs 1 process | frozen parts kept whole (MB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    mb = 2 ** 20
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['processes']} | {r['sharding']} | {r['parameters'] / mb:.2f} | "
                     f"{r['gradients'] / mb:.2f} | {r['optimizer'] / mb:.2f} | {r['total'] / mb:.2f} | "
                     f"{r['vs_one_process']:.2f}x | {r['frozen_whole'] / mb:.2f} |")
    return "\n".join(lines)


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
    if sys.argv[1] == "--state":
        out = measure_state(sys.argv[2], sys.argv[3:])
        if out is not None:
            print(json.dumps(out))
    else:
        print(json.dumps(measure(sys.argv[1], sys.argv[2:])))
