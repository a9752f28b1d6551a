"""Evaluation: fixed-seed sampling, metrics, the path KL, plots, and loading run folders.

`evaluate(run, sampler, ...)` measures one model (the run's weights drawn by a sampler)
on a run's fixed evaluation set; `evaluate_run(run_dir)` (the `diffalign eval` command)
measures a run's base and aligned models side by side and writes eval.json; `Summary` and
`EvalResult` hold summary.json and eval.json, `format_table` prints either;
`sample_run(run_dir, out)` (`diffalign sample`) draws from a run's aligned model.
Nothing here imports the training loop.
"""

from .core import (as_baseline, base_context, compare, evaluate, sample_eval, sample_metrics, save_grid, win_rate,
                   write_report_images)
from .results import EvalResult, Summary, format_table, read_result, write_result
from .run import evaluate_run, load_run
from .sample import sample_run

__all__ = ["EvalResult", "Summary", "as_baseline", "base_context", "compare", "evaluate", "evaluate_run", "format_table",
           "load_run", "read_result", "sample_eval", "sample_metrics", "sample_run", "save_grid", "win_rate",
           "write_report_images", "write_result"]
