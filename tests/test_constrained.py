"""Constrained diffusion via dual training: the dual step's math, the data sets, the method's
errors, the gradient through the adaptation constraint, infeasibility, resume, end to end."""

import json
import warnings

import numpy as np
import pytest
import torch

from diffalign.config import ConfigError
from diffalign.data import datasets
from diffalign.data import digits as digits_data
from diffalign.losses.constrained import dual_step, lagrangian
from diffalign.methods.constrained import InfeasibleWarning
from diffalign.train import Trainer, resolve_config, train

MINORITY = "digits:minority=4,5,7:fraction=0.25"
BASE = {"method": "constrained", "model": "digits", "reward": "ink", "prompts": [""],
        "sampling": {"num_steps": 6, "guidance_scale": 1.0}, "optim": {"lr": 1e-3},
        "train": {"epochs": 2, "batch_size": 16, "batches_per_epoch": 4}, "eval": {"reward": None, "per_prompt": 8}}


def _cfg(args: dict, **top):
    return resolve_config(base={**BASE, **top, "args": args})


# ---- the dual step -------------------------------------------------------------------------
def test_dual_step_hand_worked():
    mu = torch.tensor([0.0, 1.0, 0.1])
    new = dual_step(mu, torch.tensor([0.3, 0.1, 0.0]), torch.tensor([0.2, 0.2, 0.5]), lr=0.5)
    # 0 + 0.5·0.1 = 0.05; 1 + 0.5·(−0.1) = 0.95; max(0, 0.1 + 0.5·(−0.5)) = 0
    assert torch.allclose(new, torch.tensor([0.05, 0.95, 0.0]))
    # resilient at the paper's α = 0.085: 1 + 0.5·(0.3 − 0.2 − 2·0.085·1) = 0.965
    assert torch.allclose(dual_step(torch.tensor([1.0]), torch.tensor([0.3]), torch.tensor([0.2]), 0.5, alpha=0.085),
                          torch.tensor([0.965]))
    # α = 2: 1 + 0.5·(0.1 − 4) = −0.95, projected to 0
    assert float(dual_step(torch.tensor([1.0]), torch.tensor([0.3]), torch.tensor([0.2]), 0.5, alpha=2.0)) == 0.0


def test_resilient_fixed_point_is_finite_where_plain_grows():
    loss, bound = torch.tensor([0.3]), torch.tensor([0.2])  # infeasible: the loss never reaches b
    plain, res = torch.zeros(1), torch.zeros(1)
    for _ in range(2000):
        plain, res = dual_step(plain, loss, bound, 0.1), dual_step(res, loss, bound, 0.1, alpha=2.0)
    assert plain.item() == pytest.approx(20.0, rel=1e-4)  # grows by lr·0.1 per step, forever
    assert res.item() == pytest.approx(0.1 / (2 * 2.0), rel=1e-4)  # μ* = (L − b)/(2α): relaxation u = 2αμ = L − b


def test_lagrangian_gradient_is_main_plus_weighted_constraints():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    main, c1 = (w ** 2).sum(), (3 * w).sum()
    lagrangian(main, [c1], torch.tensor([0.5])).backward()
    assert torch.allclose(w.grad, 2 * w.detach() + 0.5 * 3)


# ---- data sets -----------------------------------------------------------------------------
def test_digits_specs():
    x, y = digits_data.load("train")
    full = datasets.load("digits")
    assert len(full) == len(x) and full.labels[:3] == [str(int(v)) for v in y[:3]]
    m = datasets.load(MINORITY)
    counts = {c: m.labels.count(str(c)) for c in range(10)}
    for c in range(10):
        n = int((y == c).sum())
        assert counts[c] == (round(0.25 * n) if c in (4, 5, 7) else n)
    four = datasets.load(MINORITY + ":classes=4")  # the minority set's own class-4 images, same order
    assert torch.equal(four.images, m.images[[i for i, v in enumerate(m.labels) if v == "4"]])
    few = datasets.load("digits:classes=3:count=20")
    assert len(few) == 20 and set(few.labels) == {"3"}
    assert len(datasets.load("toy2d:count=100").images) == 100


def test_png_folder_and_npz(tmp_path):
    from diffalign.data.feedback import save_png

    flat, labelled = tmp_path / "flat", tmp_path / "labelled"
    for i in range(3):
        save_png(torch.rand(1, 8, 8), flat / f"{i}.png")
        save_png(torch.rand(1, 8, 8), labelled / str(i % 2) / f"{i}.png")
    a = datasets.load(str(flat))
    assert a.images.shape == (3, 1, 8, 8) and a.labels is None
    b = datasets.load(str(labelled))
    assert sorted(b.labels) == ["0", "0", "1"]
    np.savez(tmp_path / "u8.npz", images=np.full((4, 8, 8), 255, np.uint8), labels=np.array([1, 2, 3, 4]))
    c = datasets.load(str(tmp_path / "u8.npz"))
    assert c.images.shape == (4, 1, 8, 8) and float(c.images.max()) == 1.0 and c.labels == ["1", "2", "3", "4"]


@pytest.mark.parametrize("spec, message", [
    ("digits:classes=12", "digits 0-9"),
    ("digits:fraction=0.5", "needs minority"),
    ("digits:colour=red", "key=value"),
    ("digits:minority=4:fraction=2", "(0, 1]"),
    ("/nonexistent/folder", "does not exist"),
    ("/nonexistent/file.npz", "does not exist"),
])
def test_bad_specs(spec, message):
    with pytest.raises(datasets.DatasetError, match=message.replace("(", r"\(").replace("]", r"\]")):
        datasets.load(spec)


def test_empty_folder_and_bad_npz(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetError, match="holds no PNG"):
        datasets.load(str(tmp_path / "empty"))
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 8, 8)))
    with pytest.raises(datasets.DatasetError, match="needs an 'images' array"):
        datasets.load(str(tmp_path / "x.npz"))
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 8, 8), np.float32))
    with pytest.raises(datasets.DatasetError, match="is empty"):
        datasets.load(str(tmp_path / "none.npz"))


# ---- the method's errors: each stops before the run folder is written ------------------------
def _fails(tmp_path, args, match, **top):
    cfg, a = _cfg(args, **top)
    with pytest.raises(ConfigError, match=match):
        train(cfg, a, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_errors_write_nothing(tmp_path):
    from diffalign.data.feedback import save_png

    save_png(torch.rand(1, 8, 8), tmp_path / "cats" / "cat" / "0.png")
    _fails(tmp_path, {"data": str(tmp_path / "missing")}, "does not exist")
    _fails(tmp_path, {"data": str(tmp_path / "cats")}, "labels the model 'digits' does not know")
    _fails(tmp_path, {"data": "digits", "constraints": [{"data": "samples:8", "kind": "distill", "slack": 1.5}]},
           "give an absolute 'bound'")
    _fails(tmp_path, {"data": "toy2d:count=10"}, "has no labels")


def test_config_errors():
    with pytest.raises(ConfigError, match="b_i ≤ 0"):
        _cfg({"constraints": [{"data": "digits:classes=4", "bound": -0.1}]})
    with pytest.raises(ConfigError, match="exactly one"):
        _cfg({"constraints": [{"data": "digits:classes=4"}]})
    with pytest.raises(ConfigError, match="init"):
        _cfg({"init": "random"})
    cfg, a = _cfg({"init": "scratch", "constraints": [{"data": "samples:8", "bound": 0.1}]})
    with pytest.raises(ConfigError, match="need args.init = pretrained"):
        Trainer(cfg, a, "/tmp/unused")


# ---- adaptation: the constraint's gradient reaches θ -----------------------------------------
@pytest.mark.parametrize("kind", ["distill", "denoising"])
def test_adaptation_constraint_sends_gradient(kind):
    cfg, args = _cfg({"data": "digits:classes=3:count=20", "constraints": [{"data": "samples:16", "kind": kind,
                                                                             "bound": 0.01}]}, prompts=["3"])
    tr = Trainer(cfg, args, "/tmp/unused")
    tr.method.start()
    den = tr.run.model.denoiser
    with torch.no_grad():  # move θ off the starting model: at θ = θ_start the distill loss has zero gradient
        for p in den.parameters():
            p.add_(1e-2 * torch.randn_like(p))

    def grads(mu: float):
        tr.method.mu = torch.tensor([mu])
        den.zero_grad()
        tr.method._step_fn(0, 0)()[0].backward()
        return torch.cat([p.grad.flatten() for p in den.parameters()])

    g0, g1, g2 = grads(0.0), grads(1.0), grads(2.0)
    constraint = g1 - g0
    assert constraint.norm() > 1e-3 * g0.norm() and constraint.norm() > 0
    assert torch.allclose(g2 - g0, 2 * constraint, atol=1e-5 * g0.norm())  # linear in μ: the gradient of μ·L_1


# ---- dual dynamics in a run ------------------------------------------------------------------
def test_infeasible_bound_warns_and_mu_grows(tmp_path):
    cfg, args = _cfg({"data": MINORITY, "conditional": False, "dual_every": 1, "dual_lr": 1.0, "warn_after": 5,
                      "constraints": [{"name": "4", "data": MINORITY + ":classes=4", "bound": 1e-4}]},
                     train={"epochs": 1, "batch_size": 16, "batches_per_epoch": 6})
    with pytest.warns(InfeasibleWarning, match=r"constraint '4' looks infeasible.*b = 0.0001"):
        train(cfg, args, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["mu_4"] > 0 and m["bound_4"] == pytest.approx(1e-4)
    state = json.loads(next((tmp_path / "run" / "checkpoints").iterdir()).joinpath("state.json").read_text())
    history = state["method"]["counters"]["history"]
    assert len(history) == 6 and all(b[1] > a[1] for a, b in zip(history, history[1:]))


def test_feasible_bound_keeps_mu_at_zero(tmp_path):
    cfg, args = _cfg({"data": MINORITY, "conditional": False, "dual_every": 1, "warn_after": 2,
                      "constraints": [{"name": "4", "data": MINORITY + ":classes=4", "bound": 100.0}]},
                     train={"epochs": 1, "batch_size": 16, "batches_per_epoch": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error", InfeasibleWarning)
        train(cfg, args, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["mu_4"] == 0.0


def test_resume_gives_the_same_mu_and_weights(tmp_path):
    from safetensors.torch import load_file

    args = {"data": MINORITY, "conditional": False, "init": "scratch", "dual_every": 2, "dual_lr": 5.0,
            "constraints": [{"name": "4", "data": MINORITY + ":classes=4", "bound": 0.2},
                            {"name": "5", "data": MINORITY + ":classes=5", "bound": 0.2, }]}
    cfg, a = _cfg(args, train={"epochs": 2, "batch_size": 16, "batches_per_epoch": 3})
    train(cfg, a, tmp_path / "full")
    train(cfg, a, tmp_path / "cut", max_epochs=1)
    train(cfg, a, tmp_path / "cut", resume=True)
    for run in ("full", "cut"):
        assert (tmp_path / run / "summary.json").exists()
    ck = [tmp_path / r / "checkpoints" / "epoch-000002" for r in ("full", "cut")]
    states = [json.loads((c / "state.json").read_text())["method"] for c in ck]
    assert states[0]["counters"]["history"] == states[1]["counters"]["history"]
    mus = [load_file(str(c / "method.safetensors")) for c in ck]
    assert all(torch.equal(mus[0][k], mus[1][k]) for k in mus[0])
    assert mus[0]["state.mu"].sum() > 0  # the dual steps did something (loss above b = 0.2 early on)
    w = [load_file(str(c / "modules" / "denoiser.safetensors")) for c in ck]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


# ---- end to end: the constraint raises the minority class's share ----------------------------
def test_constraint_raises_minority_share(tmp_path):
    """From scratch on digits with class 4 at a tenth of its images, unconditional: with a
    constraint on class 4 (μ held high from the start), more of the samples are 4s than
    without, after the same steps on the same data."""
    data = "digits:minority=4:fraction=0.1"
    share = {}
    for name, constraints in (("plain", []), ("constrained", [{"name": "4", "data": data + ":classes=4",
                                                              "bound": 1e-3}])):
        cfg, a = _cfg({"data": data, "conditional": False, "init": "scratch", "mu_init": 1.0, "dual_lr": 0.01,
                       "constraint_batch": 32, "warn_after": 0, "constraints": constraints},
                      optim={"lr": 2e-3}, train={"epochs": 1, "batch_size": 64, "batches_per_epoch": 150},
                      eval={"reward": None, "per_prompt": 200})
        s = train(cfg, a, tmp_path / name)
        share[name] = s["final"]["class_histogram"][4]
    assert share["constrained"] > share["plain"] + 0.1, share
