"""A run's results as data: the training summary (summary.json), a `diffalign eval` result
(eval.json), and the one table both are printed as.

Both hold two evaluations of the run's fixed evaluation set, `base` and `aligned` (dicts of
`evaluate` metrics). In code the trained model's evaluation is always `aligned`; summary.json
has stored it under "final" since its first version and keeps that key, so old run folders and
everything that reads them (bench reports, scripts) stay valid. `from_json` reads either key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint
from .core import as_baseline


@dataclass
class Comparison:
    """Base and aligned evaluations of one run, and what produced them."""

    method: str
    model: str
    reward: str
    eval_reward: str | None
    base: dict
    aligned: dict
    reward_queries: int
    wall_s: float | None

    def caption(self) -> str:
        return f"{self.method} on {self.model}: {self.reward_queries} reward queries"


@dataclass
class Summary(Comparison):
    """The end of a training run: RUN/summary.json."""

    epochs: int
    reward_budget: int | None
    processes: int
    finished: bool = True
    FILE = "summary.json"

    def caption(self) -> str:
        return f"{super().caption()}, {self.wall_s or 0:.0f} s"

    def to_json(self) -> dict:
        """summary.json's layout (the headline numbers flat, then both evaluations)."""
        b, a = self.base, self.aligned
        return {"method": self.method, "model": self.model, "reward": self.reward, "eval_reward": self.eval_reward,
                "epochs": self.epochs, "reward_budget": self.reward_budget,
                "base_reward_mean": b["reward_mean"], "final_reward_mean": a["reward_mean"],
                "base_eval_reward_mean": b.get("eval_reward_mean"), "final_eval_reward_mean": a.get("eval_reward_mean"),
                "win_rate_vs_base": a["win_rate"], "eval_win_rate_vs_base": a["eval_win_rate"],
                "kl": a.get("kl"),  # None: full fine-tuning without a reference copy (`diffalign eval` has it)
                "base": b, "final": a, "reward_queries": self.reward_queries, "wall_s": self.wall_s,
                "processes": self.processes, "finished": self.finished}

    @classmethod
    def from_json(cls, d: dict) -> Summary:
        return cls(method=d["method"], model=d["model"], reward=d["reward"], eval_reward=d.get("eval_reward"),
                   base=d["base"], aligned=d["final"] if "final" in d else d["aligned"],
                   reward_queries=d["reward_queries"], wall_s=d.get("wall_s"), epochs=d.get("epochs"),
                   reward_budget=d.get("reward_budget"), processes=d.get("processes", 1),
                   finished=d.get("finished", True))


@dataclass
class EvalResult(Comparison):
    """`diffalign eval RUN`: the newest checkpoint against the base on fixed seeds; RUN/eval.json."""

    run: str
    checkpoint: str
    epoch: int
    per_prompt: int
    seed: int
    eval_s: float | None
    FILE = "eval.json"

    def caption(self) -> str:
        return (f"{self.method} on {self.model}, {self.checkpoint}: {self.reward_queries} reward queries; "
                f"{self.per_prompt} samples per prompt, seed {self.seed}")

    def to_json(self) -> dict:
        return {"run": self.run, "method": self.method, "model": self.model, "reward": self.reward,
                "eval_reward": self.eval_reward, "checkpoint": self.checkpoint, "epoch": self.epoch,
                "reward_queries": self.reward_queries, "wall_s": self.wall_s, "per_prompt": self.per_prompt,
                "seed": self.seed, "eval_s": self.eval_s, "base": self.base, "aligned": self.aligned}

    @classmethod
    def from_json(cls, d: dict) -> EvalResult:
        return cls(method=d["method"], model=d["model"], reward=d["reward"], eval_reward=d.get("eval_reward"),
                   base=d["base"], aligned=d["aligned"] if "aligned" in d else d["final"],
                   reward_queries=d["reward_queries"], wall_s=d.get("wall_s"), run=d.get("run", ""),
                   checkpoint=d.get("checkpoint", ""), epoch=d.get("epoch"), per_prompt=d.get("per_prompt"),
                   seed=d.get("seed"), eval_s=d.get("eval_s"))


def write_result(folder: str | Path, result: Summary | EvalResult) -> Path:
    """Write `result` atomically as its file (summary.json or eval.json) in the run folder."""
    path = Path(folder) / result.FILE
    checkpoint.atomic_write_text(path, json.dumps(result.to_json(), indent=1))
    return path


def read_result(folder: str | Path, kind: type[Summary] | type[EvalResult]) -> Summary | EvalResult | None:
    """The run folder's summary.json or eval.json (None when it has none), as written by any version."""
    path = Path(folder) / kind.FILE
    return kind.from_json(json.loads(path.read_text())) if path.exists() else None


ROWS = [  # (metric, label): a row when the aligned evaluation has the metric
    ("reward_mean", "training reward ({reward})"), ("eval_reward_mean", "held-out reward ({eval_reward})"),
    ("eval_reward_accuracy", "held-out accuracy"), ("reward_accuracy", "training-classifier accuracy"),
    ("win_rate", "win rate vs base (same noise)"), ("eval_win_rate", "held-out win rate vs base (same noise)"),
    ("diversity", "diversity within a prompt"), ("frechet", "Fréchet distance to real data"),
    ("frechet_real", "Fréchet distance, same-size real sample"), ("kl", "KL to reference (nats, path)"),
    ("optimum_distance", "distance to p*"), ("optimum_floor", "floor of distance to p*"),
    ("optimum_ratio", "distance to p* / floor"),
]
ONCE = {"frechet_real", "optimum_floor"}  # properties of the evaluation set, not of a model: one column


def format_table(result: Comparison) -> str:
    """A text table of the headline metrics, base against aligned, and a caption line."""
    base = as_baseline(result.base)

    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}"

    rows = [("", "base", "aligned")]
    for key, label in ROWS:
        if result.aligned.get(key) is not None:
            name = label.format(reward=result.reward, eval_reward=result.eval_reward)
            rows.append((name, "" if key in ONCE else cell(base.get(key)), cell(result.aligned[key])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines + [result.caption()])
