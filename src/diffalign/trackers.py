"""Experiment trackers through accelerate's (`train.log_with`): TensorBoard (the default, in RUN/tb), Weights &
Biases, Trackio or MLflow. Every tracker gets the same scalars each epoch, the sample grids as images where
the tracker takes images (TensorBoard, W&B), and the run's config (flattened to `section.key`).

Steps: TensorBoard's x-axis is the reward queries so far (runs compare at equal queries); the others log
at the epoch, with `reward_queries` among the scalars (choose it as the x-axis there). A W&B run's id is
derived from the run folder, so `--resume` continues the same W&B run; `WANDB_MODE=offline` works
without a network (files under RUN/wandb, `wandb sync` uploads them later).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def missing(name: str) -> str | None:
    """Why tracker `name` cannot run here (None when it can)."""
    if name not in TRACKERS:
        return f"must be one of {', '.join(TRACKERS)}"
    if importlib.util.find_spec(TRACKERS[name]) is None:
        return f"needs the {TRACKERS[name]!r} package: pip install {TRACKERS[name]}"
    return None


def flat(config: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; values other than bool/int/float/str become their text."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = "null" if v is None else v
        else:
            out[key] = str(v)
    return out


class Tracker:
    """One tracker for the run in `out` (use it on the main process only)."""

    def __init__(self, name: str, out: Path, config: dict, project: str = "diffalign"):
        from accelerate import tracking

        why = missing(name)
        if why:
            raise ValueError(f"config key 'train.log_with' = {name!r}: {why}")
        self.name, out = name, Path(out)
        run_name = out.resolve().name
        if name == "tensorboard":
            self.tracker = tracking.TensorBoardTracker("tb", out)
        elif name == "wandb":
            run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
            os.makedirs(out / "wandb", exist_ok=True)
            self.tracker = tracking.WandBTracker(project, name=run_name, id=run_id, resume="allow", dir=str(out))
        elif name == "trackio":
            self.tracker = tracking.TrackioTracker(project, name=run_name)
        else:
            self.tracker = tracking.MLflowTracker(experiment_name=project, logging_dir=str(out / "mlruns"),
                                                  run_name=run_name)
        self.tracker.start()
        self.tracker.store_init_configuration(flat(config))

    def log(self, metrics: dict, epoch: int, reward_queries: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log(scalars, step=reward_queries if self.name == "tensorboard" else epoch)

    def log_image(self, key: str, path: Path, epoch: int, reward_queries: int) -> None:
        """A sample grid PNG, where the tracker takes images (TensorBoard, W&B)."""
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        if self.name == "tensorboard":
            self.tracker.writer.add_image(key, image, global_step=reward_queries, dataformats="HWC")
        elif self.name == "wandb":
            self.tracker.log_images({key: [image]}, step=epoch)

    def finish(self) -> None:
        self.tracker.finish()
