"""Evaluation: fixed-seed sampling, metrics, the path KL, toy2d's exact optimum, plots.

`evaluate(model, trainer, ...)` measures one model on a run's fixed evaluation set;
`evaluate_run(run_dir)` (the `diffalign eval` command) measures a run's base and
aligned models side by side and writes eval.json.
"""

from .core import compare, evaluate, sample_eval, sample_metrics, save_grid, win_rate, write_report_images
from .run import evaluate_run

__all__ = ["compare", "evaluate", "evaluate_run", "sample_eval", "sample_metrics", "save_grid", "win_rate",
           "write_report_images"]
