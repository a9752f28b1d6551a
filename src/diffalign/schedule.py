"""The learning-rate schedule: one of diffusers' (`get_scheduler`), stepped per optimizer step.

A decaying schedule (linear, cosine, polynomial, ...) needs the number of optimizer steps it spans:
`optim.total_steps`. Left at 0, the schedule spans the run. How many optimizer steps a run takes
depends on the method (minibatches, inner epochs, timesteps per step) and, under a reward budget
(`train.reward_budget`, as the benchmark runs every method), on the method's reward queries per
epoch; both are known after the first epoch. So the first epoch runs at the schedule's start (its
warm-up, then the full rate), and then the schedule is set to span

    (optimizer steps of the first epoch) × (epochs of the run)

where the run's epochs are `train.epochs`, or under a budget the epochs it buys at the first
epoch's cost (`budget_spent` stops the run there), whichever is fewer. The span is kept in the
checkpoint, so a resumed run follows the same curve. A method whose steps per epoch vary gets a
schedule that ends near, not at, its last step: set `optim.total_steps` for an exact one.
"""

from __future__ import annotations

from diffusers.optimization import get_scheduler

from .config import ConfigError

CONSTANT = ("constant", "constant_with_warmup")


class Schedule:
    """`step()`, `get_last_lr()`, `state_dict()` / `load_state_dict()` of a torch LR scheduler, and
    `epoch_done(...)`, which sets the span of a run-length schedule after the first epoch."""

    def __init__(self, optim_cfg, optimizer):
        self.cfg, self.optimizer = optim_cfg, optimizer
        self.total = optim_cfg.total_steps or None
        self.steps = 0  # optimizer steps taken (the schedule's steps)
        self.pending = optim_cfg.schedule not in CONSTANT and self.total is None
        # until the span is known: the same warm-up, then the full rate (the decay's start)
        self.inner = self._build("constant_with_warmup" if self.pending else optim_cfg.schedule, self.total)

    def _build(self, name: str, total: int | None, at: int = 0):
        """diffusers' schedule, `at` steps in (each group's rate set to its value there)."""
        return get_scheduler(name, self.optimizer, num_warmup_steps=self.cfg.warmup_steps, num_training_steps=total,
                             last_epoch=at - 1)

    def step(self) -> None:
        self.inner.step()
        self.steps += 1

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def epoch_done(self, epochs_done: int, run_epochs: int) -> str:
        """After an epoch: `epochs_done` epochs so far of the run's `run_epochs`. Sets the span once,
        after the first epoch, when it was left to the run; then returns a line saying so ("" otherwise)."""
        if not self.pending or epochs_done < 1:
            return ""
        steps = self.steps
        total = max(1, round(steps / epochs_done * run_epochs))
        if total <= self.cfg.warmup_steps:
            raise ConfigError(
                f"optim.warmup_steps = {self.cfg.warmup_steps} is not below the run's {total} optimizer steps "
                f"(the span of the '{self.cfg.schedule}' schedule, from its first epoch): lower optim.warmup_steps "
                "or set optim.total_steps")
        self.total, self.pending = total, False
        self.inner = self._build(self.cfg.schedule, total, at=steps)  # from each group's initial lr
        return (f"learning-rate schedule '{self.cfg.schedule}' spans the run: {total} optimizer steps "
                f"({steps / epochs_done:g} per epoch x {run_epochs} epochs)")

    def state_dict(self) -> dict:
        return {"total": self.total, "pending": self.pending, "steps": self.steps, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "inner" not in state:  # a checkpoint from before run-length schedules: the torch state alone
            self.inner.load_state_dict(state)
            return
        self.total, self.pending, self.steps = state["total"], state["pending"], state["steps"]
        if not self.pending:
            self.inner = self._build(self.cfg.schedule, self.total)  # (building it resets each group's lr)
        self.inner.load_state_dict(state["inner"])
        for group, lr in zip(self.optimizer.param_groups, self.inner.get_last_lr()):
            group["lr"] = lr
