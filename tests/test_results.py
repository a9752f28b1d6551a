"""Run results as data: summary.json and eval.json of any version read back, one table for both,
and `open_run` as the one way into a run folder."""

import json
import re

import pytest

from diffalign.eval.results import EvalResult, Summary, format_table, read_result, write_result
from diffalign.run_folder import open_run

BASE = {"reward_mean": 0.25, "sample_rewards": [0.0, 0.5], "kl": 0.0, "diversity": 2.0}
ALIGNED = {"reward_mean": 0.75, "sample_rewards": [1.0, 0.5], "win_rate": 0.75, "eval_win_rate": None,
           "kl": 3.5, "diversity": 1.0, "optimum_distance": 0.125, "optimum_floor": 0.0625}
# summary.json as versions before the dataclasses wrote it: the aligned evaluation under "final"
OLD_SUMMARY = {"method": "ddpo", "model": "toy2d", "reward": "quadratic", "eval_reward": None, "epochs": 3,
               "reward_budget": None, "base_reward_mean": 0.25, "final_reward_mean": 0.75,
               "base_eval_reward_mean": None, "final_eval_reward_mean": None, "win_rate_vs_base": 0.75,
               "eval_win_rate_vs_base": None, "kl": 3.5, "base": BASE, "final": ALIGNED, "reward_queries": 24,
               "wall_s": 1.5, "processes": 1, "finished": True}
OLD_EVAL = {"run": "runs/x", "method": "ddpo", "model": "toy2d", "reward": "quadratic", "eval_reward": None,
            "checkpoint": "epoch-000003", "epoch": 3, "reward_queries": 24, "wall_s": 1.5, "per_prompt": 2, "seed": 0,
            "eval_s": 0.5, "base": BASE, "aligned": ALIGNED}


def test_summary_and_eval_round_trip_their_files_key_for_key():
    s = Summary.from_json(OLD_SUMMARY)
    assert s.aligned is ALIGNED and s.base is BASE and s.epochs == 3
    assert list(s.to_json().items()) == list(OLD_SUMMARY.items())  # the same keys, in the same order
    e = EvalResult.from_json(OLD_EVAL)
    assert e.aligned is ALIGNED and e.checkpoint == "epoch-000003"
    assert list(e.to_json().items()) == list(OLD_EVAL.items())
    # an early summary without the later keys still reads
    early = {k: v for k, v in OLD_SUMMARY.items() if k not in ("processes", "eval_reward", "reward_budget")}
    assert Summary.from_json(early).processes == 1


def test_one_table_for_both():
    s, e = Summary.from_json(OLD_SUMMARY), EvalResult.from_json(OLD_EVAL)
    ts, te = format_table(s), format_table(e)
    assert ts.splitlines()[:-1] == te.splitlines()[:-1]  # the same rows; only the caption differs
    rows = {parts[0]: parts[1:] for parts in (re.split(r"\s{2,}", line.strip()) for line in ts.splitlines()[1:-1])}
    assert rows["training reward (quadratic)"] == ["0.25", "0.75"]
    assert rows["win rate vs base (same noise)"] == ["0.5", "0.75"]  # the base against itself
    assert rows["KL to reference (nats, path)"] == ["0", "3.5"]
    assert rows["floor of distance to p*"] == ["0.0625"] and not any(k.startswith("held-out") for k in rows)
    assert ts.splitlines()[-1] == "ddpo on toy2d: 24 reward queries, 2 s"
    assert te.splitlines()[-1].startswith("ddpo on toy2d, epoch-000003: 24 reward queries; 2 samples per prompt")


def test_open_run_reads_old_folders_and_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        open_run(tmp_path)
    (tmp_path / "config.yaml").write_text("method: ddpo\n")
    folder = open_run(tmp_path)
    assert folder.checkpoint is None and not folder.finished and folder.evaluation() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
        open_run(tmp_path, checkpoint_needed=True)
    with pytest.raises(FileNotFoundError, match="has not finished training"):
        open_run(tmp_path, finished=True)
    (tmp_path / "summary.json").write_text(json.dumps(OLD_SUMMARY))
    (tmp_path / "eval.json").write_text(json.dumps(OLD_EVAL))
    folder = open_run(tmp_path, finished=True)
    assert folder.summary.aligned == ALIGNED and folder.evaluation().aligned == ALIGNED
    write_result(tmp_path, folder.summary)  # written back: the file is unchanged
    assert json.loads((tmp_path / "summary.json").read_text()) == OLD_SUMMARY
    assert read_result(tmp_path, Summary) == folder.summary
