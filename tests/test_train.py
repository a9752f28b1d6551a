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
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
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
    # checkpoint_every 1, keep_checkpoints 2: the two newest epochs, each complete
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["epoch-000002", "epoch-000003"], kept
    assert all((run / "checkpoints" / k / "optimizer.pt").is_file() for k in kept)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("method", "reward", "base_reward_mean", "final_reward_mean", "reward_queries", "wall_s"):
        assert key in summary
    assert summary["reward_queries"] == 3 * 8 == s["reward_queries"]
    with pytest.raises(FileExistsError, match="not empty"):
        train(cfg, args, run)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """A method with a second module (its own lr), tensor state and a warm-up + cosine schedule:
    killed with SIGKILL after its second checkpoint and resumed, every module, the method's
    state and the learning-rate curve end as in an uninterrupted run."""
    cfg_path = tmp_path / "toy.yaml"
    import yaml

    # epochs long enough (~0.5 s) that the kill lands between the second checkpoint and the end
    spec = dict(TOY, method="extra_module_method:ValueBaseline", sampling={"num_steps": 20},
                train=dict(TOY["train"], epochs=4, batch_size=64, batches_per_epoch=1, keep_checkpoints=10),
                optim={"lr": 1e-3, "schedule": "cosine", "warmup_steps": 2},  # spans the run: 8 steps
                args={"minibatches": 2, "value_lr": 0.02})
    cfg_path.write_text(yaml.safe_dump(spec))
    full = _cli("train", str(cfg_path), "--out", str(tmp_path / "full"))
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out

    killed = _cli("train", str(cfg_path), "--out", str(tmp_path / "killed"))
    _kill_after_checkpoint(killed, tmp_path / "killed" / "checkpoints" / "epoch-000002")
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it was killed"
    assert not (tmp_path / "killed" / "checkpoints" / "epoch-000004").exists()
    resumed = _cli("train", "--resume", str(tmp_path / "killed"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming" in out and "from epoch-00000" in out
    for name in ("pytorch_lora_weights.safetensors", "value.safetensors"):
        a, b = [load_file(str(tmp_path / r / "final" / name)) for r in ("full", "killed")]
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ends = [load_file(str(tmp_path / r / "checkpoints" / "epoch-000004" / "method.safetensors")) for r in ("full", "killed")]
    assert ends[0]["state.reward_mean"] != 0 and torch.equal(ends[0]["state.reward_mean"], ends[1]["state.reward_mean"])
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("full", "killed")]
    assert [m["epoch"] for m in rows[1]] == [0, 1, 2, 3]
    assert [m["lr"] for m in rows[0]] == [m["lr"] for m in rows[1]]
    lrs = [m["lr"] for m in rows[0]]  # 2 steps per epoch: warm-up over 2 steps, then cosine down to 0 at step 8
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[1] < lrs[0]


def _kill_after_checkpoint(proc, ckpt: Path, timeout: float = 600) -> None:
    """SIGKILL `proc` as soon as checkpoint folder `ckpt` exists (or give up when it ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _toy_yaml(tmp_path, **train):
    import yaml

    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(dict(TOY, train=dict(TOY["train"], **train))))  # 2 minibatches x 2 inner epochs
    return p


def _torchrun(*args, port):
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), "-m", "diffalign.cli", *args], capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_process_with_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo), minibatches > 1: minibatches are global and each
    process takes its share of every one, so the weights equal a single-process run with the
    same global batch."""
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
                                           ("d3po", {"minibatches": 3}), ("diffusion-kto", {"beta": 500.0})])
def test_preference_methods_with_two_processes_match_one(tmp_path, method, extra):
    """Pair counts differ between processes (SPO's gap rule, D3PO's ties); every process steps
    through the same global minibatches of pairs, so two processes give one process's weights.
    Diffusion-KTO: its reference point is the mean over the global batch (gathered)."""
    import yaml

    spec = dict(TOY, method=method, train=dict(TOY["train"], epochs=2), args=extra,
                sampling={"num_steps": 8, "logprob": "mean"})
    if method == "diffusion-kto":
        from diffalign.data import feedback
        from diffalign.models import load_model
        from diffalign.rewards import build_reward
        from diffalign.sampler import Sampler

        feedback.make_pairs(load_model("digits", progress=False), build_reward("classifier"), ["1", "7"], 16,
                            tmp_path / "pairs", sampler=Sampler(num_steps=6))
        spec.update(model="digits", reward="classifier", prompts=["1", "7"], sampling={"num_steps": 6},
                    eval={"reward": None, "per_prompt": 2}, args=dict(extra, data=str(tmp_path / "pairs" / "pairs.jsonl")))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(spec))
    cfg, args = resolve_config(p)
    train(cfg, args, tmp_path / "one")
    r = _torchrun("train", str(p), "--out", str(tmp_path / "two"), port={"spo": 29541, "d3po": 29542}.get(method, 29543))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k), "training moved the adapters"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


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


def test_each_module_is_its_own_parameter_group(tmp_path):
    from diffalign.train import Trainer

    spec = dict(TOY, method="extra_module_method:ValueBaseline", optim={"lr": 1e-3, "weight_decay": 0.01},
                args={"value_lr": 0.05})
    cfg, args = resolve_config(base=spec)
    tr = Trainer(cfg, args, tmp_path / "run")
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert groups["denoiser"]["lr"] == 1e-3 and groups["denoiser"]["weight_decay"] == 0.01
    assert groups["value"]["lr"] == 0.05 and groups["value"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["value"]["params"]} == {id(p) for p in tr.method.value.parameters()}
    assert all("lora_" in n for n, p in tr.run.model.denoiser.named_parameters() if p.requires_grad)


def test_no_optimizer_step_without_items(tmp_path):
    """TailorPO with 6 pairs and minibatches 4: torch.chunk cuts 6 into 3 parts of 2, so 3 optimizer
    steps, not 4: AdamW never steps on an empty minibatch (that would still apply momentum and
    weight decay)."""
    from diffalign.train import Trainer

    spec = dict(TOY, method="tailorpo", train=dict(TOY["train"], batch_size=6), sampling={"num_steps": 4},
                args={"train_steps": [2], "minibatches": 4, "inner_epochs": 1})
    cfg, args = resolve_config(base=spec)
    tr = Trainer(cfg, args, tmp_path / "run")
    steps = []
    tr.optimizer_step = (lambda f: lambda: (steps.append(1), f())[1])(tr.optimizer_step)
    m = tr.train_epoch(0)
    assert m["pairs"] == 6 and len(steps) == len(torch.arange(6).chunk(4)) == 3
    state = tr.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {3}


def test_schedule_config_errors():
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="'optim.total_steps' must be above warmup_steps"):
        resolve_config(base=dict(TOY, optim={"schedule": "cosine", "warmup_steps": 10, "total_steps": 10}))
    with pytest.raises(ConfigError, match="'optim.schedule' must be one of constant"):
        resolve_config(base=dict(TOY, optim={"schedule": "cosin"}))


def test_schedule_spans_the_run_from_its_first_epoch():
    """optim.total_steps = 0 with a decaying schedule: the first epoch runs at the start's rate (after its
    warm-up), then the curve is diffusers' own over (steps of epoch 1) x (the run's epochs), to 0 at the
    last step, and a checkpointed schedule restores both the curve and the optimizer's rate."""
    from types import SimpleNamespace

    from diffusers.optimization import get_scheduler

    from diffalign.config import ConfigError, OptimConfig
    from diffalign.schedule import Schedule

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=1)
    sched, ref_opt = Schedule(cfg, opt()), opt()
    ref = get_scheduler("cosine", ref_opt, num_warmup_steps=1, num_training_steps=12)
    lrs = []
    for epoch in range(4):  # 3 steps per epoch, 4 epochs
        for _ in range(3):
            sched.optimizer.step(), ref_opt.step()
            sched.step(), ref.step()
            lrs.append((sched.get_last_lr()[0], ref.get_last_lr()[0]))
        said = sched.epoch_done(epoch + 1, 4)
        assert ("spans the run: 12 optimizer steps (3 per epoch x 4 epochs)" in said) == (epoch == 0)
        if epoch == 0:
            assert [a for a, _ in lrs] == [0.1, 0.1, 0.1] and sched.total == 12
            assert sched.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0])
        if epoch == 1:
            state = sched.state_dict()
    assert all(a == pytest.approx(b) for a, b in lrs[3:]) and lrs[-1][0] == pytest.approx(0.0, abs=1e-12)
    again = Schedule(cfg, opt())
    again.load_state_dict(state)
    assert again.total == 12 and again.steps == 6
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[5][1])
    again.optimizer.step(), again.step()
    assert again.get_last_lr()[0] == pytest.approx(lrs[6][1])
    fixed = Schedule(OptimConfig(lr=0.1, schedule="linear", total_steps=4), opt())
    fixed.optimizer.step(), fixed.step(), fixed.epoch_done(1, 100)
    assert fixed.total == 4 and fixed.get_last_lr()[0] == pytest.approx(0.075)
    with pytest.raises(ConfigError, match="warmup_steps = 5 is not below the run's 4 optimizer steps"):
        short = Schedule(OptimConfig(lr=0.1, schedule="cosine", warmup_steps=5), opt())
        short.optimizer.step(), short.step(), short.epoch_done(1, 4)
    # under a reward budget the run's epochs are those the budget buys at the first epochs' cost
    from diffalign.train import run_epochs

    trainer = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(epochs=1000, reward_budget=4096)),
                              run=SimpleNamespace(reward_queries=64), epoch=1)
    assert run_epochs(trainer) == 64
    trainer.cfg.train.epochs = 10
    assert run_epochs(trainer) == 10


def test_gradients_are_averaged_over_processes_not_summed(tmp_path):
    """AdamW with clipping is invariant to a constant gradient scale, so the 1-vs-2-process runs cannot tell
    a sum from a mean: this checks the averaging itself. Ranks hold gradients 1 and 2: both must end with 1.5
    (a sum gives 3); a module only rank 0 touched (gradient 4) is averaged with zeros, 2 on both ranks."""
    script = Path(__file__).with_name("average_gradients.py")
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        "29537", str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        held = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert held == {"processes": 2, "denoiser": [1.5], "flow": [2.0]}, (rank, held)


def test_the_loop_divides_accumulated_losses_steps_once_per_group_and_skips_empty_shares(tmp_path):
    """Micros with accumulate=3: one optimizer step after the third, holding the mean of the three
    gradients. A Micro whose share is empty on this process is never computed but counts as a zero
    gradient (the other processes compute it: every process steps at the same micro): (1 + 0 + 2) / 3."""
    from diffalign.methods import Micro
    from diffalign.processes import Share
    from diffalign.train import Trainer

    cfg, args = resolve_config(base=TOY)
    tr = Trainer(cfg, args, tmp_path / "run")
    p = tr.params["denoiser"][0]
    computed, grads = [], []
    tr.optimizer_step = lambda: (grads.append(p.grad.clone()), tr.optimizer.zero_grad(set_to_none=True))

    def micro(k, share=None, accumulate=3):
        return Micro(lambda: (computed.append(k), ((k * p).sum(), {"k": k}))[1], share, accumulate)

    empty = Share(torch.empty(0, dtype=torch.long), 4, 2)
    tr.method.micro_steps = lambda batch: [micro(1), micro(9, empty), micro(2), micro(5, accumulate=1)]
    m = tr.update(None)
    assert computed == [1, 2, 5] and len(grads) == 2
    assert torch.equal(grads[0], torch.full_like(p, 1.0)) and torch.equal(grads[1], torch.full_like(p, 5.0))
    assert m == {"k": pytest.approx(8 / 3)}
    tr.method.micro_steps = lambda batch: [micro(1), micro(2)]
    with pytest.raises(RuntimeError, match="2 micro-step"):
        tr.update(None)
