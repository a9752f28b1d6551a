"""Diffusion-KTO next to Diffusion-DPO trained from the same pairs, over several seeds.

Builds one pairs set from the digits base model and the `classifier` reward, derives
KTO's labels from it by the Pick-a-Pic rule, trains both methods with the shipped
configs (only the seed and the data paths differ), and writes `results.json` and
`report.md` (mean ± std over seeds) into --out.

    python scripts/compare_offline.py --out runs/compare_offline --pairs 256 --seeds 3

Finished cells are skipped, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = [
    ("final_eval_reward_mean", "held-out reward"),
    ("final_reward_mean", "training reward"),
    ("eval_win_rate_vs_base", "win rate vs base (held-out)"),
    ("win_rate_vs_base", "win rate vs base (training)"),
    ("wall_s", "wall s"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compare_offline")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs for both methods")
    a = p.parse_args()

    from accelerate.state import AcceleratorState

    from diffalign.data import feedback
    from diffalign.models import load_model
    from diffalign.rewards import build_reward
    from diffalign.train import resolve_config, train

    out = Path(a.out)
    pairs_dir, labels_dir = out / "data" / "pairs", out / "data" / "labels"
    if not (pairs_dir / "pairs.jsonl").exists():
        model = load_model("digits")
        feedback.make_pairs(model, build_reward("classifier"), model.prompts, a.pairs, pairs_dir, seed=0)
    if not (labels_dir / "labels.jsonl").exists():
        _, counts = feedback.labels_from_pairs(pairs_dir / "pairs.jsonl", labels_dir)
        print(f"labels: {counts}")

    rows = []
    for seed in range(a.seeds):
        for method, cfg_file, data in (
            ("diffusion-dpo", "configs/diffusion_dpo_digits.yaml", pairs_dir / "pairs.jsonl"),
            ("diffusion-kto", "configs/diffusion_kto_digits.yaml", labels_dir / "labels.jsonl"),
        ):
            run = out / f"{method}-seed{seed}"
            if not (run / "summary.json").exists():
                AcceleratorState._reset_state(True)
                sets = [f"seed={seed}", f"args.data={data}"] + ([f"train.epochs={a.epochs}"] if a.epochs else [])
                cfg, args = resolve_config(cfg_file, sets)
                train(cfg, args, run, resume=(run / "config.yaml").exists())
            s = json.loads((run / "summary.json").read_text())
            rows.append({"method": method, "seed": seed, **{k: s.get(k) for k, _ in KEYS},
                         "base_eval_reward_mean": s["base_eval_reward_mean"]})
    (out / "results.json").write_text(json.dumps(rows, indent=1))

    lines = [f"# Diffusion-DPO vs Diffusion-KTO on digits ({a.pairs} pairs, {a.seeds} seeds)", "",
             f"Base held-out reward: {rows[0]['base_eval_reward_mean']:.3f}", "",
             "| method | " + " | ".join(label for _, label in KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for method in ("diffusion-dpo", "diffusion-kto"):
        vals = [[r[k] for r in rows if r["method"] == method] for k, _ in KEYS]
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}" for v in vals]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
