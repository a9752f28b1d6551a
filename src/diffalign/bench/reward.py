"""`diffalign bench reward`: reward queries per second in-process against the same reward served over HTTP
(`diffalign reward serve` in its own process on a free local port), lossless and as 8-bit PNGs, with
several requests in flight. What the HTTP path costs on top of the reward itself: encoding, the request,
decoding, and the server's batching."""

from __future__ import annotations

import statistics
import time

import torch


def _images(n: int) -> tuple[torch.Tensor, list[str]]:
    """Inputs the embedded rewards accept: digits-sized images and digit prompts."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), [str(i % 10) for i in range(n)]


def bench_reward(reward: str = "classifier", batch: int = 64, repeats: int = 5, chunk: int = 16,
                 concurrency: int = 4) -> dict:
    """Median queries/s of `reward` on `batch` images: in-process, and over HTTP as one request (lossless,
    PNG) and as `batch / chunk` concurrent requests (lossless; the server batches what arrives together)."""
    from ..rewards import build_reward
    from ..serve import free_port, spawn

    x, prompts = _images(batch)
    port = free_port()
    server = spawn(reward, port)
    url = f"http://127.0.0.1:{port}"
    try:
        ways = {"in-process": build_reward(reward),
                "http, lossless, 1 request": build_reward(f"http(url={url}, batch={batch})"),
                "http, png, 1 request": build_reward(f"http(url={url}, batch={batch}, encoding=png)"),
                f"http, lossless, {batch // chunk} requests of {chunk} ({concurrency} at once)":
                    build_reward(f"http(url={url}, batch={chunk}, concurrency={concurrency})")}
        times: dict = {k: [] for k in ways}
        for r in range(repeats + 1):
            for name, fn in ways.items():
                start = time.perf_counter()
                with torch.no_grad():
                    fn(x, prompts)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"reward": reward, "batch": batch, "repeats": repeats,
                "rows": [{"way": k, "seconds": s, "queries_per_s": batch / s, "vs_in_process": s / med["in-process"]}
                         for k, s in med.items()]}
    finally:
        server.kill()
        server.wait()


def format_reward(r: dict) -> str:
    lines = [f"reward {r['reward']!r}, {r['batch']} images per call, median of {r['repeats']}:", "",
             "| how | queries/s | time per call (ms) | × in-process |", "|---|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['way']} | {row['queries_per_s']:.0f} | {1000 * row['seconds']:.1f} | "
                     f"{row['vs_in_process']:.2f} |")
    return "\n".join(lines)
