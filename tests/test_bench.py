"""`diffalign eval` and `diffalign bench` as a user runs them, on tiny settings."""

import json
import os

import pytest
import yaml

from diffalign.cli import main

TOY = {"model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 4},
       "train": {"epochs": 2, "batch_size": 8, "batches_per_epoch": 1}, "optim": {"lr": 1e-3},
       "eval": {"reward": None, "per_prompt": 50, "beta": 1.0}}
ARGS = {"ddpo": {"clip_range": 0.2, "minibatches": 2}, "tailorpo": {"train_steps": [4, 2], "minibatches": 1}}



def _configs(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    for m, args in ARGS.items():
        (d / f"{m}_toy2d.yaml").write_text(yaml.safe_dump(dict(TOY, method=m, args=args)))
    return d


def test_eval_command_writes_eval_json(tmp_path, capsys):
    cfg = _configs(tmp_path) / "ddpo_toy2d.yaml"
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--per-prompt", "40", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "distance to p*" in out and "KL to reference" in out
    e = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert e["per_prompt"] == 40 and e["seed"] == 7 and e["aligned"]["n"] == 40 and e["reward_queries"] == 16
    assert e["base"]["kl"] == 0.0 and e["aligned"]["kl"] > 0
    assert e["aligned"]["win_rate"] > 0.5 and e["base"]["win_rate"] == 0.5 and e["aligned"]["optimum_floor"] > 0
    assert main(["eval", str(tmp_path / "run"), "--n", "30"]) == 0  # one prompt: 30 samples
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["aligned"]["n"] == 30
    # the same seed gives the same base numbers as the run's own evaluation at its size
    assert main(["eval", str(tmp_path / "run")]) == 0
    e2 = json.loads((tmp_path / "run" / "eval.json").read_text())
    base = json.loads((tmp_path / "run" / "eval_base.json").read_text())
    assert e2["base"]["reward_mean"] == pytest.approx(base["reward_mean"], abs=1e-6)
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_bench_runs_every_cell_resumes_and_reports(tmp_path, capsys):
    configs = _configs(tmp_path)
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "toy2d", "--methods", "ddpo,tailorpo", "--seeds", "2", "--budget", "60",
            "--per-prompt", "64", "--out", str(out), "--configs", str(configs)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| ddpo |" in printed and "| tailorpo |" in printed and "| base |" in printed
    r = json.loads((out / "results.json").read_text())
    assert [(x["method"], x["seed"]) for x in r["rows"]] == [("ddpo", 0), ("ddpo", 1), ("tailorpo", 0), ("tailorpo", 1)]
    for row in r["rows"]:
        assert 0 < row["reward_queries"] <= 60 and row["wall_s"] > 0
        for key in ("reward_mean", "diversity", "frechet", "win_rate", "kl", "optimum_distance", "optimum_floor"):
            assert row[f"base_{key}"] is not None and row[f"aligned_{key}"] is not None, key
        assert row["base_kl"] == 0 and row["curve"]
    ddpo = [x for x in r["rows"] if x["method"] == "ddpo"]
    assert ddpo[0]["reward_queries"] == 56  # 8 per epoch: 7 epochs fit in 60
    assert ddpo[0]["aligned_reward_mean"] != ddpo[1]["aligned_reward_mean"]  # seeds differ
    for name in ("report.md", "reward_vs_queries.png", "reward_vs_diversity.png", "samples.png"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "dist. to p*" in report and "× floor" in report
    fid = next(line for line in report.splitlines() if line.startswith("| base vs its training data |"))
    row = r["rows"][0]  # the base's own fidelity: its distance to the mixture it learned, and that over its floor
    assert f"{row['base_data_distance']:.3f}" in fid and f"{row['base_data_ratio']:.2f}" in fid
    assert row["aligned_optimum_ratio"] == pytest.approx(row["aligned_optimum_distance"] / row["aligned_optimum_floor"])

    # rerun: every finished cell is read back, not trained again
    stamp = {p: os.path.getmtime(p) for p in out.glob("runs/*/*/summary.json")}
    assert main(argv) == 0
    assert {p: os.path.getmtime(p) for p in out.glob("runs/*/*/summary.json")} == stamp
    assert json.loads((out / "results.json").read_text())["rows"] == r["rows"]

    # results at another budget never mix into this folder; unknown methods name the configs
    assert main(argv[:-4] + ["--budget", "30", "--out", str(out), "--configs", str(configs)]) == 2
    assert "budget = 60" in capsys.readouterr().err
    assert main(["bench", "--suite", "toy2d", "--methods", "ddpoo", "--out", str(tmp_path / "b2"),
                 "--configs", str(configs)]) == 2
    assert "no config for method 'ddpoo'" in capsys.readouterr().err


def test_bench_variants_are_rows_of_their_own_and_a_diverging_one_is_reported(tmp_path, capsys, monkeypatch):
    """name@key=value runs the config with overrides under its own label (a front on the figure); a
    run that diverges (FloatingPointError) is written down as such and the bench goes on."""
    import diffalign.train

    real = diffalign.train.train

    def train(cfg, args, out, **kw):
        if cfg.optim.lr > 1:
            raise FloatingPointError("loss became inf in method 'ddpo'; lower optim.lr")
        return real(cfg, args, out, **kw)

    monkeypatch.setattr(diffalign.train, "train", train)
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "toy2d", "--methods", "ddpo,ddpo@optim.lr=1e-2,ddpo@optim.lr=10", "--seeds", "1",
            "--budget", "24", "--per-prompt", "32", "--out", str(out), "--configs", str(_configs(tmp_path))]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    rows = {x["method"]: x for x in r["rows"]}
    assert rows["ddpo@optim.lr=1e-2"]["algorithm"] == "ddpo"
    assert rows["ddpo"]["aligned_reward_mean"] != rows["ddpo@optim.lr=1e-2"]["aligned_reward_mean"]
    assert "lower optim.lr" in rows["ddpo@optim.lr=10"]["failed"]
    assert (out / "runs" / "ddpo@optim.lr=10" / "seed-0" / "failed.json").exists()
    report = (out / "report.md").read_text()
    assert "| ddpo@optim.lr=10 (diverged: 1 of 1 seeds) |" in report and (out / "reward_vs_diversity.png").exists()
    assert main(argv) == 0  # rerun: the failure is read back, not retried
    assert json.loads((out / "results.json").read_text())["rows"] == r["rows"]


def test_bench_step_replays_the_updates_model_calls(tmp_path):
    """`bench step` times a method's update against a bare forward+backward of exactly the calls the
    update made (recorded): DDPO on toy2d makes one model call per micro-step (no guidance)."""
    from diffalign.bench.step import bench_step, format_step

    r = bench_step(["ddpo"], configs=_configs(tmp_path), suite="toy2d", repeats=1, out=tmp_path / "step")
    (row,) = r["rows"]
    assert row["method"] == "ddpo" and row["model_calls"] == row["micro_steps"] > 0
    assert row["optimizer_steps"] == 2 and row["bare_s"] > 0 and row["loss_ratio"] > 0
    assert "| ddpo |" in format_step(r) and (tmp_path / "step" / "step.json").exists()


def test_flow_suites_run_the_ddim_configs_on_the_flow_model():
    from pathlib import Path

    from diffalign.bench.suite import cell_overrides, config_path, plan
    from diffalign.train import resolve_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for suite, base in (("toy2d-flow", "toy2d"), ("digits-flow", "digits")):
        p = plan(suite, overrides=["seed=3"])
        assert p["model"] == suite and "grpo" in p["methods"]
        assert config_path(configs, "ddpo", suite).name == f"ddpo_{base}.yaml"  # the suite's fallback configs
        assert config_path(configs, "grpo", suite).name == f"grpo_{suite.replace('-', '_')}.yaml"  # its own first
        cfg, _ = resolve_config(config_path(configs, "tailorpo-g", suite),
                                cell_overrides(p, "tailorpo-g@args.delta=0.25", configs))
        assert (cfg.model, cfg.sampling.eta, cfg.seed, cfg.args["delta"]) == (suite, 0.7, 3, 0.25)
        # a method with a config of its own for the suite keeps it as written: NFT's deterministic rollouts
        assert "nft" in p["methods"] and "awm" in p["methods"]
        cfg, _ = resolve_config(config_path(configs, "nft", suite), cell_overrides(p, "nft", configs))
        assert (cfg.model, cfg.sampling.eta, cfg.seed) == (suite, 0.0, 3)


def test_race_table_counts_queries_to_the_reference_reward_levels():
    """GRPO goes from 0 to 0.2 (mean of two seeds): levels 0.1 (half-way) and 0.2. NFT, evaluated with
    another sampler, starts at 0.15 (already past half-way) and reaches 0.2 at 256 queries in one seed."""
    from diffalign.bench.report import race_table

    rows = [{"method": "grpo", "eval_curve": [[0, 0.0, 0.0], [256, 0.1, 10.0], [512, 0.2, 20.0]]},
            {"method": "grpo", "eval_curve": [[0, 0.0, 0.0], [256, 0.15, 12.0], [512, 0.2, 22.0]]},
            {"method": "nft", "eval_curve": [[0, 0.15, 0.0], [128, 0.17, 2.0], [256, 0.2, 4.0]]},
            {"method": "nft", "eval_curve": [[0, 0.15, 0.0], [128, 0.16, 3.0], [256, 0.19, 6.0]]},
            {"method": "awm", "eval_curve": [[0, -0.1, 0.0], [256, 0.05, 1.0]]}]
    table = race_table({"rows": rows})
    assert "half-way (0.1000) and all the way (0.2000)" in table
    assert "| grpo | 0.0000 | 0.2000 | 256 | 11 | 512 | 21 |" in table  # 0.1 reached at 256 in both seeds
    assert "| nft | 0.1500 | 0.1950 | 0 (own base) | 0 | 256 (1 of 2) | 4 |" in table
    assert "| awm | -0.1000 | 0.0500 | not reached (0 of 1) | – | not reached (0 of 1) | – |" in table
    assert race_table({"rows": rows[2:]}) == ""  # no reference method: no race
    ddpo = [{**r, "method": "ddpo"} for r in rows[:2]]  # without GRPO, DDPO is the reference
    assert "from ddpo's base" in race_table({"rows": ddpo + rows[2:]})


def test_bench_unpaired_feedback_gives_kto_labels_and_dpo_the_pairs_they_form(tmp_path, capsys):
    """--feedback unpaired: one labelled set per seed (budget images, half desirable), KTO trains on
    the labels, DPO on the pairs they form; the regime is a bench setting that never mixes."""
    from diffalign.bench.suite import ensure_feedback, plan
    from diffalign.run_folder import open_run

    configs = tmp_path / "configs"
    configs.mkdir()
    for m in ("diffusion-dpo", "diffusion-kto"):
        (configs / f"{m.replace('-', '_')}_toy2d.yaml").write_text(
            yaml.safe_dump(dict(TOY, method=m, reward="1.0*quadratic", train=dict(TOY["train"], epochs=1),
                                args={"beta": 100.0})))  # a weighted reward: no distance to p*, a quicker evaluation
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "toy2d", "--methods", "diffusion-dpo,diffusion-kto", "--seeds", "1", "--budget", "40",
            "--per-prompt", "16", "--out", str(out), "--configs", str(configs), "--feedback", "unpaired"]
    assert main(argv) == 0
    data = out / "data" / "unpaired" / "seed-0"
    stats = json.loads((data / "stats.json").read_text())
    assert {k: stats[k] for k in ("images", "desirable", "undesirable", "pairs", "reward_queries")} == {
        "images": 40, "desirable": 20, "undesirable": 20, "pairs": 20, "reward_queries": 40}
    reads = {m: open_run(out / "runs" / m / "seed-0").config()[1].data for m in ("diffusion-dpo", "diffusion-kto")}
    assert reads == {"diffusion-dpo": str(data.resolve() / "pairs.jsonl"),
                     "diffusion-kto": str(data.resolve() / "labels.jsonl")}
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["diffusion-kto"]["feedback"] == {"regime": "unpaired", "file": "labels", "images": 40,
                                                 "desirable": 20, "undesirable": 20, "pairs": 20}
    assert rows["diffusion-dpo"]["feedback"]["file"] == "pairs" and rows["diffusion-dpo"]["reward_queries"] == 40
    assert ("Feedback: unpaired, 40 base samples labelled alone (20 desirable: above their prompt's median reward); "
            "KTO learns from the labels, DPO from the 20 pairs formed from them.") in (out / "report.md").read_text()
    assert not (out / "data" / "seed-0").exists()  # the paired regime's folder is left alone
    capsys.readouterr()
    assert main(argv[:-1] + ["imbalanced"]) == 2  # another regime: another --out
    assert "feedback = unpaired, not imbalanced" in capsys.readouterr().err
    paired = plan("toy2d")  # the default: the pair set, for every offline method (KTO too)
    (out / "data" / "seed-0").mkdir()
    (out / "data" / "seed-0" / "stats.json").write_text(json.dumps({"pairs": 20, "ties": 2, "wall_s": 1.0,
                                                                    "reward_queries": 40}))
    kto = ensure_feedback(paired, out, 0, cfg=None, reads="labels")  # built already: read back
    assert kto["path"] == str((out / "data" / "seed-0" / "pairs.jsonl").resolve()) and kto["feedback"] == {
        "regime": "paired", "file": "pairs", "images": 36, "desirable": 18, "undesirable": 18, "pairs": 18}
    with pytest.raises(ValueError, match="unknown feedback regime 'pairs'"):
        plan("toy2d", feedback="pairs")
