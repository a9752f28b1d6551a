"""Rollouts through diffusers' solvers (`sampling.scheduler`, `diffalign.solvers`), evaluation with one
sampler for every method (`eval.sampling`), continuous training times, per-reward advantages."""

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.eval.core import eval_sampler
from diffalign.losses import group_advantages
from diffalign.models import load_model
from diffalign.sampler import Sampler
from diffalign.sampling import random_timesteps
from diffalign.train import resolve_config, train


def _final(model, sampler, n=16, prompts=("3",)):
    g = torch.Generator().manual_seed(0)
    return sampler.sample(model, [p for p in prompts for _ in range(n)], generator=g, with_logprob=False).final


@pytest.mark.parametrize("model, solver", [("digits", "ddim"), ("digits-flow", "euler")])
def test_first_order_solver_is_the_own_deterministic_step(model, solver):
    """DDIM's eta-0 step (ε models) and the flow Euler step are what the own sampler does at eta 0."""
    m = load_model(model, progress=False)
    own = _final(m, Sampler(num_steps=8, eta=0.0))
    torch.testing.assert_close(_final(m, Sampler(num_steps=8, eta=0.0, solver=solver)), own, rtol=0, atol=1e-5)


def test_second_order_solvers_integrate_the_flow_ode_better():
    """On digits-flow at 8 steps, DPM-Solver++(2M) and UniPC(2) land nearer the 100-step ODE solution than
    the Euler step does (and than their own first order)."""
    m = load_model("digits-flow", progress=False)
    exact = _final(m, Sampler(num_steps=100, eta=0.0), n=8)
    err = {(s, o): float((_final(m, Sampler(num_steps=8, eta=0.0, solver=s, order=o), n=8) - exact).abs().mean())
           for s, o in [("euler", 1), ("dpmsolver++", 1), ("dpmsolver++", 2), ("unipc", 2)]}
    assert err["dpmsolver++", 2] < 0.75 * err["euler", 1], err
    assert err["unipc", 2] < 0.75 * err["euler", 1], err
    assert err["dpmsolver++", 2] < err["dpmsolver++", 1], err


def test_solver_trajectories_have_no_logprob_and_refuse_what_they_cannot_do():
    m = load_model("toy2d-flow", progress=False)
    s = Sampler(num_steps=5, eta=0.0, solver="dpmsolver++")
    traj = s.sample(m, [""] * 4, generator=torch.Generator().manual_seed(0), with_logprob=False)
    assert traj.log_probs is None and traj.x0_preds is None and traj.latents.shape[1] == 6
    assert torch.isfinite(traj.final).all()
    with pytest.raises(ValueError, match="no log-probability"):
        s.sample(m, [""] * 4, with_logprob=True)
    with pytest.raises(ValueError, match="use 'euler'"):
        Sampler(num_steps=5, eta=0.0, solver="ddim").sample(m, [""] * 2, with_logprob=False)
    with pytest.raises(ValueError, match="score correction"):
        s.replace(correction=lambda *a: 0).sample(m, [""] * 2, with_logprob=False)


def test_config_errors_name_the_fix():
    base = {"model": "toy2d", "reward": "quadratic", "prompts": [""]}
    with pytest.raises(ConfigError, match="deterministic solver"):
        resolve_config(base={**base, "method": "ddpo", "sampling": {"scheduler": "unipc"}})
    with pytest.raises(ConfigError, match="sampling.scheduler"):
        resolve_config(base={**base, "method": "nft", "sampling": {"scheduler": "heun"}})
    with pytest.raises(ConfigError, match="eval.sampling.*unknown keys"):
        resolve_config(base={**base, "method": "nft", "eval": {"sampling": {"steps": 4}}})
    cfg, _ = resolve_config(base={**base, "method": "ddpo", "eval": {"sampling": {"eta": 0, "num_steps": 7}}})
    s = eval_sampler(Sampler(num_steps=20, eta=1.0), cfg.eval.sampling)
    assert (s.num_steps, s.eta, s.solver) == (7, 0, None)
    assert eval_sampler(Sampler(), {"scheduler": "unipc", "order": 3}).solver == "unipc"


def test_random_timesteps_cover_the_training_range():
    g = torch.Generator().manual_seed(0)
    ddim = load_model("digits", progress=False).scheduler
    t = random_timesteps(ddim, 20000, g)
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == ddim.config.num_train_timesteps - 1
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift, median in [(1.0, 0.5), (3.0, 0.75)]:  # σ = shift·u / (1 + (shift − 1)·u) at u = 1/2
        flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s = random_timesteps(flow, 20000, g) / 1000
        assert 0 < float(s.min()) and float(s.max()) < 1
        assert float(s.median()) == pytest.approx(median, abs=0.01)


def test_per_reward_advantages_hand_worked():
    """Two parts in groups of 2: part a = (0, 2 | 1, 1), part b = (10, 0 | 0, 40), weights (1, 0.5).
    Group std: a (1 | 0), b (5 | 20); A_a = (−1, 1 | 0, 0), A_b ≈ (1, −1 | −1, 1);
    Σ w·A = (−0.5, 0.5 | −0.5, 0.5). The raw weighted sum (10·0.5 + 0 = 5, 2 | 1, 21) gives (1, −1 | −1, 1):
    part b's scale decides the first group's sign."""
    parts = torch.tensor([[0.0, 10], [2, 0], [1, 0], [1, 40]])
    w = torch.tensor([1.0, 0.5])
    adv, keep = group_advantages(parts, 2, weights=w)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5]), atol=1e-4, rtol=0)
    assert keep.all()
    total, _ = group_advantages(parts @ w, 2)
    torch.testing.assert_close(total, torch.tensor([1.0, -1, -1, 1]), atol=1e-4, rtol=0)
    one, _ = group_advantages(parts[:, :1], 2)  # one part, weight 1: the plain advantages
    torch.testing.assert_close(one, group_advantages(parts[:, 0], 2)[0])
    _, keep = group_advantages(torch.tensor([[1.0, 3], [1, 3], [0, 0], [1, 0]]), 2)
    assert keep.tolist() == [False, False, True, True]


def test_nft_through_dpmsolver_with_continuous_times_raises_the_reward(tmp_path):
    """nft's rollouts through DPM-Solver++(2M), trained at continuous times, on a weighted sum of rewards
    normalised per part, and every evaluation (base and aligned) through UniPC: the reward moves up."""
    cfg, args = resolve_config(base={
        "method": "nft", "model": "digits-flow", "reward": {"classifier": 1.0, "ink": 0.1}, "prompts": ["1", "7"],
        "seed": 0, "sampling": {"num_steps": 6, "scheduler": "dpmsolver++"}, "optim": {"lr": 3e-3},
        "eval": {"reward": None, "per_prompt": 8, "sampling": {"scheduler": "unipc", "num_steps": 5}},
        "train": {"epochs": 2, "batch_size": 32, "batches_per_epoch": 1},
        "args": {"group_size": 8, "minibatches": 2, "timesteps": "continuous"}})
    s = train(cfg, args, tmp_path / "run")
    assert s["final_reward_mean"] > s["base_reward_mean"], s
