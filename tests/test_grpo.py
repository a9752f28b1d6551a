"""GRPO: group advantages and the closed-form step KL on hand-worked values, ratio 1 at the
first update, the MixGRPO window, bad input, and end to end on the flow models: GRPO and every
other likelihood method raise the reward on toy2d-flow."""

import math
from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.losses import group_advantages, step_kl
from diffalign.sampler import Sampler
from diffalign.train import resolve_config, train

ROOT = Path(__file__).resolve().parents[1]
TOY_FLOW = {"method": "grpo", "model": "toy2d-flow", "reward": "quadratic", "prompts": [""],
            "sampling": {"num_steps": 10, "eta": 0.7}, "train": {"batch_size": 16, "batches_per_epoch": 1},
            "eval": {"reward": None, "per_prompt": 64}, "optim": {"lr": 1e-3}, "args": {"group_size": 4}}


# ---- losses ---------------------------------------------------------------------------------
def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 2.0])
    adv, keep = group_advantages(r, 2)
    # groups (1, 3): mean 2, std 1 -> ∓1/(1 + 1e-4); (5, 5): all equal -> 0, dropped; (0, 2): ∓1
    s = 1 / (1 + 1e-4)
    assert torch.allclose(adv, torch.tensor([-s, s, 0.0, 0.0, -s, s]))
    assert keep.tolist() == [True, True, False, False, True, True]
    adv_g, _ = group_advantages(r, 2, global_std=True)
    std = float(r.double().std(unbiased=False))
    assert torch.allclose(adv_g, torch.tensor([-1, 1, 0, 0, -1, 1]) / (std + 1e-4))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


def test_step_kl_hand_values_gradient_and_dt():
    mean, ref, std = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5]])
    assert float(step_kl(mean, ref, std, "sum")) == pytest.approx((1 + 4) / (2 * 0.25))
    assert float(step_kl(mean, ref, std, "mean")) == pytest.approx((1 + 4) / (2 * 0.25) / 2)
    m = mean.clone().requires_grad_(True)
    step_kl(m, ref, std).sum().backward()
    assert (m.grad * (mean - ref)).sum() > 0  # descending moves the policy's mean towards the reference's
    # on a flow step the std is g·sqrt(|dt|): the KL is ||Δμ||² / (2 g² |dt|), not / (2 g²) (Flow-GRPO #78)
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.sampling import step_with_logprob

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    s.set_timesteps(sigmas=[0.5, 0.4])
    x = torch.zeros(1, 3)
    p = step_with_logprob(s, torch.ones(1, 3), s.timesteps[0], x, eta=1.0, with_logprob=False)
    q = step_with_logprob(s, torch.zeros(1, 3), s.timesteps[0], x, eta=1.0, with_logprob=False)
    dmu2 = float(((p.mean - q.mean) ** 2).sum())
    assert float(step_kl(p.mean, q.mean, p.std)) == pytest.approx(dmu2 / (2 * 1.0 * 0.1), rel=1e-5)


# ---- the method -----------------------------------------------------------------------------
def _run(tmp_path, **changes):
    spec = {**TOY_FLOW, **changes}
    cfg, args = resolve_config(base=spec)
    from diffalign.context import Run
    from diffalign.methods import build

    run = Run(cfg)
    return run, build(run, args)


def test_ratio_is_one_at_the_first_update_and_kl_zero(tmp_path):
    run, method = _run(tmp_path, args={"group_size": 4, "kl_beta": 0.1, "minibatches": 2})
    batch, metrics = method.collect(0)
    assert 0 < metrics["kept_fraction"] <= 1
    for micro in list(method.micro_steps(batch))[:6]:
        loss, info = micro.compute()
        assert float(info["ratio"]) == pytest.approx(1.0, abs=1e-6)
        assert float(info["kl"]) == pytest.approx(0.0, abs=1e-10)  # θ = reference before any update
        assert torch.isfinite(loss)


def test_mix_window_slides_and_wraps(tmp_path):
    _, method = _run(tmp_path, args={"group_size": 4, "mix_window": 4, "mix_stride": 2, "mix_shift_every": 2})
    # 10 steps, window 4, stride 2: starts 0, 2, 4, 6, then back to 0; each held for 2 epochs
    assert [method.window(e)[0] for e in range(12)] == [0, 0, 2, 2, 4, 4, 6, 6, 0, 0, 2, 2]
    assert method.window(0) == (0, 1, 2, 3)
    batch, metrics = method.collect(2)
    assert metrics["window_start"] == 2
    assert set(batch.steps.tolist()) <= {2, 3, 4, 5}
    assert torch.isnan(batch.traj.log_probs[:, 0]).all() and torch.isfinite(batch.traj.log_probs[:, 2:6]).all()
    _, plain = _run(tmp_path)
    assert plain.window(5) is None


def test_bad_input_is_refused_early():
    with pytest.raises(ConfigError, match="not a multiple of args.group_size"):
        _run(None, train={"batch_size": 10, "batches_per_epoch": 1})
    with pytest.raises(ConfigError, match="sampling.eta > 0"):
        resolve_config(base={**TOY_FLOW, "sampling": {"num_steps": 10, "eta": 0.0}})
    with pytest.raises(ConfigError, match="mix_window"):
        _run(None, args={"group_size": 4, "mix_window": 11})
    with pytest.raises(ValueError, match="group_size"):
        resolve_config(base={**TOY_FLOW, "args": {"group_size": 1}})
    with pytest.raises(ValueError, match="sde"):
        resolve_config(base={**TOY_FLOW, "sampling": {"eta": 0.7, "sde": "ode"}})


def test_grpo_raises_the_reward_on_toy2d_flow_with_and_without_a_window(tmp_path):
    for name, extra in (("plain", {}), ("mix", {"mix_window": 5})):
        cfg, args = resolve_config(ROOT / "configs" / "grpo_toy2d_flow.yaml",
                                   ["train.epochs=8", "eval.per_prompt=200"] + [f"args.{k}={v}" for k, v in extra.items()])
        s = train(cfg, args, tmp_path / name)
        assert s["final_reward_mean"] > s["base_reward_mean"] + 0.5, (name, s["base_reward_mean"], s["final_reward_mean"])


@pytest.mark.parametrize("method", ["ddpo", "d3po", "spo", "tailorpo", "tailorpo-g", "dpok", "nabla-gfn"])
def test_every_likelihood_method_raises_the_reward_on_toy2d_flow(tmp_path, method):
    """The toy2d configs with the flow model swapped in: the toy2d-flow bench's cells at its budget (a
    quarter of it is too little for SPO, which spends 1024 queries in its first epoch)."""
    cfg, args = resolve_config(ROOT / "configs" / f"{method.replace('-', '_')}_toy2d.yaml",
                               ["model=toy2d-flow", "sampling.eta=0.7", "train.reward_budget=4096",
                                "train.epochs=1000", "eval.per_prompt=200"])
    s = train(cfg, args, tmp_path / method)
    assert math.isfinite(s["final_reward_mean"])
    assert s["final_reward_mean"] > s["base_reward_mean"] + 0.3, (s["base_reward_mean"], s["final_reward_mean"])


def test_sampler_from_config_carries_the_sde():
    cfg, _ = resolve_config(base={**TOY_FLOW, "sampling": {"num_steps": 10, "eta": 0.5, "sde": "dance"}})
    from diffalign.models import load_model

    s = Sampler.from_config(cfg.sampling, load_model("toy2d-flow", progress=False))
    assert (s.sde, s.eta) == ("dance", 0.5)
