"""`bench tune` and the paired-difference table: hand-worked intervals, the trial draws, the split between
the validation trials and the final seeds."""

import json

import numpy as np
import pytest
import yaml

from diffalign.bench.paired import bootstrap_ci, paired, paired_table
from diffalign.bench.tune import fmt, score, trials
from diffalign.cli import main


def test_bootstrap_interval_by_hand():
    # two values: resampled means are 1, 1.5, 2 with probability 1/4, 1/2, 1/4 -> the 95% interval is [1, 2]
    assert bootstrap_ci([1.0, 2.0]) == (1.0, 2.0)
    assert bootstrap_ci([0.3] * 6) == pytest.approx((0.3, 0.3))
    lo, hi = bootstrap_ci(np.arange(10.0))
    assert 2.5 < lo < 4.5 < hi < 6.5  # the mean 4.5, its standard error 0.91
    assert bootstrap_ci(np.arange(10.0)) == (lo, hi)  # deterministic
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci([1.0])


def _rows(diffs, noise):
    """Reference 'a' and method 'b' on the same seeds: b = a + diff, with a seed effect both share."""
    rows = []
    for s, (d, n) in enumerate(zip(diffs, noise)):
        rows.append({"method": "a", "seed": s, "aligned_reward_mean": n, "aligned_diversity_rel": 1.0})
        rows.append({"method": "b", "seed": s, "aligned_reward_mean": n + d, "aligned_diversity_rel": 1.0})
    return rows


def test_paired_differences_remove_the_shared_seed_effect():
    # a seed effect of ±5 swamps a difference of 0.1 between means, but not between paired values
    noise = [5.0, -5.0, 3.0, -3.0, 0.0]
    rows = _rows([0.1, 0.12, 0.08, 0.11, 0.09], noise)
    assert paired(rows, "b", "a", "reward_mean") == pytest.approx([0.1, 0.12, 0.08, 0.11, 0.09])
    table = paired_table({"rows": rows}, "a")
    line = next(x for x in table.splitlines() if x.startswith("| b |"))
    assert line.startswith("| b | 5 | **+0.100 [+0.0") and "| +0.00 [+0.00, +0.00] |" in line
    # three seeds: the interval is shown, never read as a verdict; a diverged seed is left out of the pairs
    rows3 = _rows([0.1, 0.12, 0.08], noise[:3]) + [{"method": "b", "seed": 3, "failed": "inf"}]
    line = next(x for x in paired_table({"rows": rows3}, "a").splitlines() if x.startswith("| b |"))
    assert line.startswith("| b | 3 | +0.100 [") and "**" not in line
    assert paired_table({"rows": rows}, "c") == ""  # no such reference: no table


def test_trials_start_from_the_config_and_stay_within_the_spread():
    labels = trials("diffusion-dpo", {"optim.lr": 1e-4, "args.beta": 2000.0}, 6, spread=10)
    assert labels[0] == "diffusion-dpo" and len(set(labels)) == 6
    assert trials("diffusion-dpo", {"optim.lr": 1e-4, "args.beta": 2000.0}, 6, spread=10) == labels
    for label in labels[1:]:
        values = dict(kv.split("=") for kv in label.split("@")[1:])
        assert 1e-5 <= float(values["optim.lr"]) <= 1e-3 and 200 <= float(values["args.beta"]) <= 20000
        assert yaml.safe_load(values["optim.lr"]) == float(values["optim.lr"])  # a YAML number, not a string
    assert fmt(3e-05) == "0.00003" and fmt(2000.0) == "2000"
    with pytest.raises(ValueError, match="trials"):
        trials("ddpo", {"optim.lr": 1e-3}, 0)


def test_score_signs_the_metric_and_disqualifies_a_diverged_seed():
    rows = [{"method": "m", "seed": 0, "aligned_optimum_ratio": 2.0}, {"method": "m", "seed": 1, "aligned_optimum_ratio": 4.0},
            {"method": "n", "seed": 0, "aligned_eval_reward_mean": -0.2}, {"method": "n", "seed": 1, "failed": "nan"}]
    assert score(rows, "m", "optimum_ratio") == -3.0  # lower is better: negated
    assert score(rows, "n", "eval_reward_mean") is None


TOY = {"model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 4},
       "train": {"epochs": 2, "batch_size": 8, "batches_per_epoch": 1}, "optim": {"lr": 1e-3},
       "eval": {"reward": None, "per_prompt": 32, "beta": 1.0}}


def _configs(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ddpo_toy2d.yaml").write_text(yaml.safe_dump(dict(TOY, method="ddpo", args={"minibatches": 1})))
    (configs / "diffusion-dpo_toy2d.yaml").write_text(yaml.safe_dump(
        dict(TOY, method="diffusion-dpo", train={**TOY["train"], "epochs": 1}, args={"beta": 500.0})))
    return configs


def test_the_tuned_keys_are_the_learning_rate_and_the_regulariser(tmp_path):
    from diffalign.bench.tune import space

    configs = _configs(tmp_path)
    assert space("toy2d", "diffusion-dpo", configs) == {"optim.lr": 1e-3, "args.beta": 500.0}
    assert space("toy2d", "ddpo", configs) == {"optim.lr": 1e-3}  # DDPO has no KL weight: its lr only
    assert space("toy2d", "ddpo", configs, ["optim.lr=0.01"]) == {"optim.lr": 0.01}  # --set applies


def test_bench_tune_chooses_on_the_validation_split_and_compares_on_fresh_seeds(tmp_path, capsys):
    out = tmp_path / "tune"
    argv = ["bench", "tune", "--suite", "toy2d", "--methods", "diffusion-dpo", "--trials", "3", "--seeds", "2",
            "--budget", "16", "--per-prompt", "32", "--out", str(out), "--configs", str(_configs(tmp_path))]
    assert main(argv) == 0
    tried = json.loads((out / "trials" / "results.json").read_text())
    assert [r["seed"] for r in tried["rows"]] == [100] * 3 and "eval.seed=4321" in tried["overrides"]
    tuning = json.loads((out / "tune.json").read_text())
    assert tuning["metric"] == "optimum_ratio" and tuning["keys"] == {"diffusion-dpo": ["optim.lr", "args.beta"]}
    best = min(tried["rows"], key=lambda r: r["aligned_optimum_ratio"])  # the lowest validation distance to p*
    assert tuning["chosen"]["diffusion-dpo"] == best["method"]
    final = json.loads((out / "final" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in final["rows"]] == [(best["method"], 0), (best["method"], 1)]
    assert "eval.seed=4321" not in final["overrides"]
    assert "Tuned: 3 trials per method" in (out / "final" / "report.md").read_text()
    assert "| diffusion-dpo | 0 | as shipped |" in (out / "tune.md").read_text()
    assert "chosen:" in capsys.readouterr().out
