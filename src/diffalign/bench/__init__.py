"""Benchmarks: `sampler` (speed of sampling with log-probs against diffusers' loop) and
`suite` (every method at an equal budget of reward queries, over seeds, with a report)."""

from .sampler import bench_sampler
from .suite import SUITES, plan, run_bench

__all__ = ["SUITES", "bench_sampler", "plan", "run_bench"]
