"""A run folder, opened in one place: `open_run(dir)` serves resume, eval, sample, export and bench.

    RUN/config.yaml      the resolved config, written first: a folder without it holds no run
    RUN/checkpoints/     epoch-NNNNNN/ folders; the newest is resumed, evaluated or exported
    RUN/summary.json     written when training finishes (`eval.results.Summary`)
    RUN/eval.json        written by `diffalign eval` (`eval.results.EvalResult`)

Opening reads no weights: `eval.run.load_run` builds the models on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .eval.results import EvalResult, Summary, read_result

CONFIG = "config.yaml"


@dataclass
class RunFolder:
    """What a run folder holds, without loading any weights."""

    folder: Path
    checkpoint: Path | None  # the newest; None before the first epoch ends
    summary: Summary | None  # None until training finishes

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def config(self, overrides: list[str] | None = None):
        """The run's resolved config and method arguments (`overrides`: key=value strings)."""
        from .methods import resolve_config

        return resolve_config(self.folder / CONFIG, overrides)

    def evaluation(self) -> EvalResult | None:
        """The newest `diffalign eval` result, if any."""
        return read_result(self.folder, EvalResult)


def holds_run(run_dir: str | Path) -> bool:
    """True when `run_dir` holds a run (finished or not)."""
    return (Path(run_dir) / CONFIG).exists()


def open_run(run_dir: str | Path, checkpoint_needed: bool = False, finished: bool = False) -> RunFolder:
    """Open the run in `run_dir`; refuse a folder that holds no run, and, when asked, one
    without a checkpoint (`checkpoint_needed`) or one that has not finished training (`finished`)."""
    folder = Path(run_dir)
    if not holds_run(folder):
        raise FileNotFoundError(f"{folder} is not a run folder (no {CONFIG}): pass the --out folder of "
                                "`diffalign train`")
    newest = checkpoint.latest(folder / "checkpoints")
    if checkpoint_needed and newest is None:
        raise FileNotFoundError(f"{folder} has no checkpoint yet: train (or resume) it for at least one epoch")
    summary = read_result(folder, Summary)
    if finished and summary is None:
        where = f" (newest checkpoint {newest.name})" if newest else ""
        raise FileNotFoundError(f"{folder} has not finished training{where}: resume it with "
                                f"`diffalign train --resume {folder}`")
    return RunFolder(folder, newest, summary)
