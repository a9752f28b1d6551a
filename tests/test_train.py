"""The training loop as a user runs it: end to end, resume after SIGKILL, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.train import resolve_config, train

TOY = {
    "method": "ddpo",
    "model": "toy2d",
    "reward": "quadratic",
    "prompts": [""],
    "sampling": {"num_steps": 8},
    "train": {"epochs": 3, "batch_size": 8, "batches_per_epoch": 1},
    "eval": {"reward": None, "per_prompt": 16},
    "optim": {"lr": 1e-3},
    "args": {"clip_range": 0.2, "minibatches": 2, "inner_epochs": 2},
}



def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "diffalign.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_run_folder_contents_and_refuses_to_overwrite(tmp_path):
    cfg, args = resolve_config(base=TOY)
    s = train(cfg, args, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval_base.json", "samples/base.png",
                 "samples/final.png", "reward_curve.png", "final/pytorch_lora_weights.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir()), "TensorBoard events"
    assert len((run / "checkpoints").iterdir().__next__().name) > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("method", "reward", "base_reward_mean", "final_reward_mean", "reward_queries", "wall_s"):
        assert key in summary
    assert summary["reward_queries"] == 3 * 8 == s["reward_queries"]
    with pytest.raises(FileExistsError, match="not empty"):
        train(cfg, args, run)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    cfg_path = tmp_path / "toy.yaml"
    import yaml

    spec = dict(TOY, train=dict(TOY["train"], epochs=4))
    cfg_path.write_text(yaml.safe_dump(spec))
    full = _cli("train", str(cfg_path), "--out", str(tmp_path / "full"))
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    killed = _cli("train", str(cfg_path), "--out", str(tmp_path / "killed"))
    ck = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ck.exists() and any(p.name == "epoch-000002" for p in ck.iterdir())):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it was killed"
    resumed = _cli("train", "--resume", str(tmp_path / "killed"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    metrics = [json.loads(x)["epoch"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [0, 1, 2, 3]


def _toy_yaml(tmp_path, **train):
    import yaml

    p = tmp_path / "toy.yaml"
    # minibatches=1: each process splits only its own samples into minibatches, so only
    # whole-batch steps are the same computation for any number of processes
    p.write_text(yaml.safe_dump(dict(TOY, train=dict(TOY["train"], **train), args=dict(TOY["args"], minibatches=1))))
    return p


def _torchrun(*args, port):
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), "-m", "diffalign.cli", *args], capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_process_with_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo): gradients synchronise, so the weights equal a
    single-process run with the same global batch."""
    cfg_path = _toy_yaml(tmp_path, epochs=2)
    cfg, args = resolve_config(cfg_path)
    train(cfg, args, tmp_path / "one")
    r = _torchrun("train", str(cfg_path), "--out", str(tmp_path / "two"), port=29531)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["processes"] == 2 and s2["reward_queries"] == 16
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    changed = [k for k in a if "lora_B" in k and a[k].abs().max() > 0]
    assert changed, "training moved the adapters"
    for k in a:
        # float summation order differs across processes; Adam can amplify that near zero gradients
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_batch_not_divisible_by_processes(tmp_path):
    cfg_path = _toy_yaml(tmp_path, batch_size=7)
    r = _torchrun("train", str(cfg_path), "--out", str(tmp_path / "never"), port=29532)
    assert r.returncode != 0
    assert "'train.batch_size' = 7 is not divisible by the 2 processes" in r.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_ddpo_raises_classifier_reward_on_digits(tmp_path):
    """End to end on the embedded default: a short DDPO run raises the reward on fixed eval seeds."""
    cfg, args = resolve_config(
        "configs/ddpo_digits.yaml" if Path("configs/ddpo_digits.yaml").exists() else
        Path(__file__).parents[1] / "configs" / "ddpo_digits.yaml",
        ["train.epochs=4", "eval.per_prompt=6"],
    )
    s = train(cfg, args, tmp_path / "digits")
    assert s["final_reward_mean"] > s["base_reward_mean"] + 0.02, s


@pytest.mark.parametrize("method, extra", [("spo", {"k": 3, "single_path_steps": 4, "temperature": 0.5, "minibatches": 8}),
                                           ("d3po", {"minibatches": 2})])  # spo: 4 vs 6 pairs -> 4 vs 6 steps unpadded
def test_preference_methods_finish_with_two_processes(tmp_path, method, extra):
    """Pair counts differ between processes (SPO's gap rule, D3PO's ties); every process must
    still take the same number of optimizer steps, or gradient sync would hang."""
    import yaml

    spec = dict(TOY, method=method, train=dict(TOY["train"], epochs=2), args=extra,
                sampling={"num_steps": 8, "logprob": "mean"})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(spec))
    r = _torchrun("train", str(p), "--out", str(tmp_path / "run"), port=29541 if method == "spo" else 29542)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["processes"] == 2


def test_reward_budget_ends_training_without_exceeding_it(tmp_path):
    """8 queries per epoch, budget 20: two epochs (16); a third would make 24. Resume changes nothing."""
    spec = dict(TOY, train=dict(TOY["train"], epochs=50, reward_budget=20))
    cfg, args = resolve_config(base=spec)
    s = train(cfg, args, tmp_path / "run")
    assert s["finished"] and s["reward_queries"] == 16 and s["epochs"] == 2 and s["reward_budget"] == 20
    assert s["final"]["kl"] > 0 and "optimum_distance" in s["final"] and "diversity_rel" in s["final"]
    before = (tmp_path / "run" / "summary.json").read_text()
    again = train(cfg, args, tmp_path / "run", resume=True)
    assert again["reward_queries"] == 16 and again["epochs"] == 2
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads(before)["final"]["reward_mean"] == again["final"]["reward_mean"]
