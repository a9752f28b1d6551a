"""DiffusionNFT and AWM (`losses.forward`, `methods/forward.py`): hand-worked losses, the NFT = AWM
identity at decay 0, the x0-space form, the anchor, and the reward moving on the embedded models."""

import pytest
import torch

from diffalign.losses import ppo_clip_loss
from diffalign.losses.forward import (awm_surrogate, decay, implicit_policies, nft_loss, optimality_probability,
                                      proximal)
from diffalign.train import resolve_config, train


def test_optimality_probability_and_decay_schedules():
    r = optimality_probability(torch.tensor([-10.0, -2.5, 0.0, 5.0]), 5.0)
    assert r.tolist() == [0.0, 0.25, 0.5, 1.0]
    assert decay(100, 0.001, 0.5) == pytest.approx(0.1) and decay(1000, 0.001, 0.5) == 0.5  # NFT "type 1"
    assert decay(50, 0.0075, 0.999, 75) == 0.0 and decay(175, 0.0075, 0.999, 75) == pytest.approx(0.75)  # "type 2"


def test_nft_loss_hand_worked():
    pos, neg, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    r = torch.tensor([0.75])
    # plain: l+ = mean(1, 1) = 1, l- = mean(0, 1) = 0.5; 5 (0.75 + 0.25 * 0.5) / 0.5 = 8.75
    per, _ = nft_loss(pos, neg, target, r, beta=0.5, adv_max=5.0, adaptive=False)
    assert per.item() == pytest.approx(8.75)
    # adaptive: each divided by its mean |error|: 1 / 1 and 0.5 / 0.5, so 5 (0.75 + 0.25) / 0.5 = 10
    per, _ = nft_loss(pos, neg, target, r, beta=0.5, adv_max=5.0, adaptive=True)
    assert per.item() == pytest.approx(10.0)
    plus, minus = implicit_policies(torch.tensor([2.0]), torch.tensor([1.0]), beta=0.5)
    assert (plus.item(), minus.item()) == (1.5, 0.5)  # 0.5 * 2 + 0.5 * 1, 1.5 * 1 - 0.5 * 2


def test_awm_surrogate_hand_worked_and_ratio_one():
    mse, t = torch.tensor([0.5], requires_grad=True), torch.tensor([0.8])
    ell = awm_surrogate(mse, t, "ghuber", 0.25)  # -(0.8 / 0.25) ((0.5 + 1e-10)^0.25 - 1e-10^0.25)
    assert ell.item() == pytest.approx(-3.2 * (0.5 ** 0.25 - 1e-10 ** 0.25), rel=1e-7)  # t is float32
    ell.sum().backward()
    assert mse.grad.item() == pytest.approx(-0.8 * 0.5 ** -0.75, rel=1e-6)  # -t (mse + 1e-10)^(p - 1)
    assert awm_surrogate(torch.tensor([0.5]), t, "uniform").item() == -0.5
    assert awm_surrogate(torch.tensor([0.5]), t, "t").item() == pytest.approx(-0.4)
    per, info = ppo_clip_loss(ell.detach(), ell.detach(), torch.tensor([0.3]), 1.0)
    assert per.item() == pytest.approx(-0.3) and info["clipfrac"] == 0  # on-policy: ratio exactly 1


def test_nft_at_decay_zero_is_awm():
    """With the anchor equal to the current model (decay 0, detached), NFT's gradient in the plain
    velocity form is 2·clip(A)·(v − u)/D: A_max times AWM's uniform-weight gradient with clip(A)/A_max."""
    g = torch.Generator().manual_seed(0)
    v0, u = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    adv = torch.tensor([-7.0, -2.0, -0.5, 0.0, 1.5, 6.0])
    for beta in (0.1, 1.0):
        v = v0.clone().requires_grad_(True)
        pos, neg = implicit_policies(v, v.detach(), beta)
        per, _ = nft_loss(pos, neg, u, optimality_probability(adv, 5.0), beta, 5.0, adaptive=False)
        per.sum().backward()
        w = v0.clone().requires_grad_(True)
        ell = awm_surrogate((w - u).pow(2).mean(1), torch.ones(6), "uniform")
        awm, _ = ppo_clip_loss(ell, ell.detach(), adv.clamp(-5, 5) / 5, 1.0)
        awm.sum().backward()
        torch.testing.assert_close(v.grad, 5.0 * w.grad.float())
        torch.testing.assert_close(v.grad, 2 * adv.clamp(-5, 5)[:, None] * (v0 - u) / 4)
        # descending moves positive-advantage samples toward the target and negative ones away
        assert ((v.grad * (v0 - u)).sum(1) * adv.sign() >= 0).all()


@pytest.mark.parametrize("model", ["digits-flow", "digits"])
def test_implicit_policies_are_the_same_in_x0_space(model):
    """x̂0 is affine in the prediction, so NFT's x0-space policies are the x̂0 of its prediction-space ones."""
    from diffalign.models import load_model
    from diffalign.sampling import x0_from_output

    m = load_model(model, progress=False)
    s, g = m.scheduler, torch.Generator().manual_seed(1)
    x_t = torch.randn(3, *m.sample_shape, generator=g)
    pred, old = torch.randn_like(x_t), torch.randn_like(x_t)
    t = torch.tensor([200, 500, 900]) if model == "digits" else torch.tensor([200.0, 500.0, 900.0])
    via_pred = [x0_from_output(s, p, t, x_t) for p in implicit_policies(pred, old, 0.7)]
    via_x0 = implicit_policies(x0_from_output(s, pred, t, x_t), x0_from_output(s, old, t, x_t), 0.7)
    for a, b in zip(via_pred, via_x0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert proximal(pred, old).shape == (3,)


def test_anchor_follows_its_schedule_and_sampling_uses_it():
    from diffalign.methods import build
    from diffalign.context import Run

    cfg, args = resolve_config(base={"method": "nft", "model": "toy2d", "reward": "quadratic", "prompts": [""],
                                     "train": {"batch_size": 8}, "args": {"decay_rate": 0.1, "decay_max": 0.3}})
    run = Run(cfg)
    method = build(run, args)
    method._update_anchor()  # the first call copies θ
    params = method._trained()
    name, p = next(iter(params.items()))
    assert torch.equal(method.anchor[name], p) and method.anchor[name].data_ptr() != p.data_ptr()
    with torch.no_grad():
        p.add_(1.0)
    method.steps = 2  # η = min(0.1 · 2, 0.3) = 0.2
    before = method.anchor[name].clone()
    assert method._update_anchor() == pytest.approx(0.2)
    torch.testing.assert_close(method.anchor[name], 0.2 * before + 0.8 * p.detach())
    with method.anchored():
        assert torch.equal(method._trained()[name], method.anchor[name])
    assert torch.equal(method._trained()[name], p)  # restored


@pytest.mark.parametrize("method, model", [("nft", "digits-flow"), ("awm", "digits-flow"), ("nft", "digits"),
                                           ("awm", "digits")])
def test_forward_methods_raise_the_reward(tmp_path, method, model):
    cfg, args = resolve_config(base={
        "method": method, "model": model, "reward": "classifier", "prompts": ["1", "7"], "seed": 0,
        "sampling": {"num_steps": 6}, "optim": {"lr": 3e-3}, "eval": {"reward": None, "per_prompt": 16},
        "train": {"epochs": 3, "batch_size": 32, "batches_per_epoch": 1}, "args": {"group_size": 8, "minibatches": 2}})
    s = train(cfg, args, tmp_path / "run")
    assert s["final_reward_mean"] > s["base_reward_mean"], s


@pytest.mark.parametrize("method", ["nft", "awm"])
def test_two_processes_match_one(tmp_path, method):
    """Global minibatches, per-sample noise and grid times drawn by global sample index, the anchor
    updated from the same weights: torchrun with 2 processes ends with one process's weights."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file

    spec = {"method": method, "model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 6},
            "train": {"epochs": 3, "batch_size": 16, "batches_per_epoch": 1}, "eval": {"reward": None, "per_prompt": 8},
            "optim": {"lr": 1e-3}, "args": {"minibatches": 2, "decay_rate": 0.2}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(spec))
    cfg, args = resolve_config(p)
    train(cfg, args, tmp_path / "one")
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str({"nft": 29581, "awm": 29582}[method]), "-m", "diffalign.cli", "train", str(p), "--out",
                        str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (load_file(str(tmp_path / x / "final" / "pytorch_lora_weights.safetensors")) for x in ("one", "two"))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
