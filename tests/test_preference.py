"""D3PO, SPO, TailorPO, TailorPO-G: the shared clipped DPO loss, gradient directions,
branching, guidance, and end-to-end reward gains on digits."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffalign import trajectory
from diffalign.config import ConfigError
from diffalign.methods.preference import clipped_dpo_loss, step_logprob
from diffalign.methods.tailorpo import TailorConfig, TailorPO
from diffalign.train import Trainer, resolve_config, train
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
LOG2 = math.log(2.0)



# ---- the shared loss ---------------------------------------------------------------
def _loss(lw, ll, beta, clip):
    z = torch.zeros(1)
    return clipped_dpo_loss(torch.tensor([lw]), z, torch.tensor([ll]), z, beta, clip)[0].item()


def test_loss_hand_values_and_clipping():
    assert _loss(0.0, 0.0, 0.1, 0.1) == pytest.approx(LOG2)
    # inside the clip: z = beta (0.05 - (-0.02)) = 0.07 -> log(1 + e^-0.07)
    assert _loss(0.05, -0.02, 1.0, 0.1) == pytest.approx(math.log1p(math.exp(-0.07)), abs=1e-6)
    # clipped: log r_w -> log 1.1, log r_l -> log 0.9, beta 10
    z = 10 * (math.log(1.1) - math.log(0.9))
    assert _loss(0.5, -0.5, 10.0, 0.1) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)
    # winner ratio clipped at 1 - eps from below
    z = 2 * (math.log(0.9) - 0.03)
    assert _loss(-3.0, 0.03, 2.0, 0.1) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)
    # outside the clip range the gradient vanishes
    lw = torch.tensor([0.5], requires_grad=True)
    clipped_dpo_loss(lw, torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0, 0.1)[0].backward()
    assert lw.grad.item() == 0.0


TOY = {
    "model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 8},
    "train": {"epochs": 1, "batch_size": 8, "batches_per_epoch": 1},
    "eval": {"reward": None, "per_prompt": 16}, "optim": {"lr": 1e-3},
}


@pytest.mark.parametrize("method,args", [
    ("d3po", {}), ("spo", {"single_path_steps": 4, "threshold": 0.0}), ("tailorpo", {"train_steps": [8, 4]}),
    ("tailorpo", {"train_steps": [8, 4], "same_condition": False}),
])
def test_loss_is_log2_before_any_update(tmp_path, method, args):
    cfg, a = resolve_config(base=dict(TOY, method=method, args=args))
    tr = Trainer(cfg, a, tmp_path)
    with torch.no_grad():
        data, metrics = tr.method.collect(0)
    assert metrics["pairs"] > 0
    micro = next(iter(tr.method.micro_steps(data)))
    loss, info = micro.compute()
    assert loss.item() == pytest.approx(LOG2, abs=1e-5)
    assert info["logratio_w"] == pytest.approx(0.0, abs=1e-5)
    p = data["pairs"]
    if method in ("spo", "tailorpo") and args.get("same_condition", True):
        assert torch.equal(p.x_t_w, p.x_t_l)  # same condition
    if method == "d3po" or not args.get("same_condition", True):
        assert not torch.equal(p.x_t_w, p.x_t_l)


def test_d3po_skips_ties(tmp_path):
    cfg, a = resolve_config(base=dict(TOY, method="d3po"))
    tr = Trainer(cfg, a, tmp_path)
    tr.score = lambda images, prompts, metadata=None: torch.zeros(len(prompts))  # every pair tied
    with torch.no_grad():
        data, m = tr.method.collect(0)
    assert data["pairs"] is None and list(tr.method.micro_steps(data)) == []


def test_tailorpo_g_refuses_non_differentiable_reward(tmp_path):
    cfg, a = resolve_config(base=dict(TOY, method="tailorpo-g", model="digits", reward="compressibility"))
    with pytest.raises(ConfigError, match="differentiable"):
        Trainer(cfg, a, tmp_path)


# ---- gradient direction (METHODS.md Eq. 11) ------------------------------------------
KW = dict(eta=1.0, guidance_scale=1.0, reduction="sum", num_steps=10)


def _setup():
    m = tiny_model()
    m.scheduler.set_timesteps(10)
    t = m.scheduler.timesteps[3]
    cond = torch.tensor([0, 1])
    return m, copy.deepcopy(m), t, cond


def _mean(m, x_t, t, cond):
    with torch.no_grad():
        eps = trajectory.predict_eps(m, x_t, t, cond, 1.0)
        from diffalign.sampling import step_with_logprob

        return step_with_logprob(m.scheduler, eps, t, x_t, eta=1.0, prev_sample=x_t).mean


def _sgd_step(m, ref, x_t_w, x_t_l, x_w, x_l, t, cond, params, lr):
    with torch.no_grad():
        rw = step_logprob(ref, x_t_w, t, cond, x_w, **KW)
        rl = step_logprob(ref, x_t_l, t, cond, x_l, **KW)
    lw = step_logprob(m, x_t_w, t, cond, x_w, **KW)
    ll = step_logprob(m, x_t_l, t, cond, x_l, **KW)
    loss, _ = clipped_dpo_loss(lw, rw, ll, rl, beta=0.1, clip=0.5)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_tailorpo_update_moves_mean_toward_winner():
    m, ref, t, cond = _setup()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 1, 4, 4, generator=g)
    mean = _mean(m, x_t, t, cond)
    x_w, x_l = mean + 0.3 * torch.randn(2, 1, 4, 4, generator=g), mean + 0.3 * torch.randn(2, 1, 4, 4, generator=g)
    _sgd_step(m, ref, x_t, x_t, x_w, x_l, t, cond, m.denoiser.parameters(), lr=1e-3)
    d = _mean(m, x_t, t, cond) - mean
    assert ((d * (x_w - x_l)).flatten(1).sum(1) > 0).all()


def test_d3po_with_different_conditions_can_point_the_other_way():
    """Only the output bias trains: the mean moves by the same vector at every x_t,
    proportional to (x_w - mean_w) - (x_l - mean_l). With x_w below its own mean, x_l
    above its own, but mean_w far above mean_l, the update moves away from x_w - x_l."""
    m, ref, t, cond = _setup()
    cond = cond[:1]
    x_t_w, x_t_l = torch.full((1, 1, 4, 4), 2.0), torch.full((1, 1, 4, 4), -2.0)
    mean_w, mean_l = _mean(m, x_t_w, t, cond), _mean(m, x_t_l, t, cond)
    d = (mean_w - mean_l) / (mean_w - mean_l).norm()
    x_w, x_l = mean_w - 0.2 * d, mean_l + 0.2 * d
    assert ((x_w - x_l) * d).sum() > 0  # the winner is still "above" the loser
    _sgd_step(m, ref, x_t_w, x_t_l, x_w, x_l, t, cond, [m.denoiser.out.bias], lr=1e-3)
    moved = _mean(m, x_t_w, t, cond) - mean_w
    assert ((moved * (x_w - x_l)).sum()) < 0
    # the same-condition loss with these children (both from x_t_w) points toward x_w
    m2, ref2, _, _ = _setup()
    x_l2 = mean_w + 0.2 * d
    _sgd_step(m2, ref2, x_t_w, x_t_w, x_w, x_l2, t, cond, [m2.denoiser.out.bias], lr=1e-3)
    moved2 = _mean(m2, x_t_w, t, cond) - mean_w
    assert (moved2 * (x_w - x_l2)).sum() > 0


# ---- branching and guidance with a fake trainer ---------------------------------------
def _fake(reward_fn, **args):
    m = tiny_model()
    calls = []

    def score(images, prompts, metadata=None):
        calls.append(len(prompts))
        return reward_fn(images)

    t = SimpleNamespace(model=m, score=score, cfg=SimpleNamespace(sampling=SimpleNamespace(
        num_steps=10, eta=1.0, guidance_scale=1.0, logprob="sum")), device="cpu")
    meth = object.__new__(TailorPO)
    meth.t, meth.args = t, TailorConfig(**args)
    return meth, calls


def test_branching_children_share_x_t_and_winner_continues():
    meth, calls = _fake(lambda im: im.flatten(1).mean(1))  # brighter is better
    m = meth.t.model
    m.scheduler.set_timesteps(10)
    prompts = ["0", "1", "2"]
    cond = m.encode_prompts(prompts)
    traj = trajectory.sample(m, prompts, num_steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                             branch_steps=[0, 5], k=2, choose=meth.make_choose(prompts, cond, m.scheduler.timesteps, {}))
    assert len(traj.branches) == 2 and sum(calls) == 2 * 2 * 3
    for br in traj.branches:
        assert torch.equal(br.x_t, traj.latents[:, br.step])  # both children come from this x_t
        s = br.info["scores"]
        assert torch.equal(br.chosen, s.argmax(1))
        rows = torch.arange(3)
        assert torch.equal(traj.latents[:, br.step + 1], br.children[rows, br.chosen])  # the winner continued


def test_guidance_raises_winner_reward_and_zero_gradient_changes_nothing():
    target = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    meth, calls = _fake(lambda im: -((im - target) ** 2).flatten(1).sum(1), guidance=True, eta_min=0.5, eta_max=1.0)
    m = meth.t.model
    m.scheduler.set_timesteps(10)
    ts = m.scheduler.timesteps
    prompts = ["0", "1"]
    cond = m.encode_prompts(prompts)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.no_grad():
        r0 = meth.step_reward(x, 6, cond, prompts, ts)
        x_new, r_new, moved = meth.guide(x, 6, cond, prompts, ts, r0)
    assert moved.all() and (r_new > r0).all()
    assert not torch.equal(x_new, x)
    # zero reward gradient: nothing moves
    meth0, _ = _fake(lambda im: im.sum((1, 2, 3)) * 0.0, guidance=True)
    with torch.no_grad():
        r0 = meth0.step_reward(x, 6, cond, prompts, ts)
        x0, r0b, moved0 = meth0.guide(x, 6, cond, prompts, ts, r0)
    assert not moved0.any() and torch.equal(x0, x) and torch.equal(r0b, r0)
    # cosine schedule: larger steps at small t
    assert meth.eta_schedule(0) == pytest.approx(1.0) and meth.eta_schedule(1000) == pytest.approx(0.5)
    assert meth.eta_schedule(100) > meth.eta_schedule(800)


def test_spo_pairs_best_worst_gap_and_random_continuation():
    from diffalign.methods.spo import SPO

    meth, calls = _fake(lambda im: im.flatten(1).mean(1) * 20)
    spo = object.__new__(SPO)
    spo.t, spo.args = meth.t, SPO.Config(k=4, threshold=0.3, temperature=1.0)
    m = spo.t.model
    m.scheduler.set_timesteps(10)
    prompts = ["0", "1", "2"] * 4
    cond = m.encode_prompts(prompts)
    traj = trajectory.sample(m, prompts, num_steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                             branch_steps=range(6, 10), k=4,
                             choose=spo.choose_fn(prompts, cond, m.scheduler.timesteps, torch.Generator().manual_seed(0)))
    assert sum(calls) == 4 * 4 * 12  # every candidate scored through trainer.score
    not_best = 0
    for br in traj.branches:
        s, info = br.info["scores"], br.info
        assert torch.equal(info["best"], s.argmax(1)) and torch.equal(info["worst"], s.argmin(1))
        p = torch.softmax(s, 1)
        assert torch.equal(info["keep"], (p.max(1).values - p.min(1).values) > 0.3)
        not_best += int((br.chosen != info["best"]).sum())
    assert not_best > 0  # continuation is random, not the best


# ---- end to end ------------------------------------------------------------------------
UNTUNED = pytest.mark.xfail(strict=False, reason="digits config not yet tuned/verified to raise the reward in 4 epochs")
E2E = {
    "d3po": ["train.epochs=12"],  # the config's 32 epochs are the bench budget; 12 show the direction
    "spo": [],
    "tailorpo": [],
    "tailorpo_g": [],
}
SEEDS = {"tailorpo": [0, 1, 2]}
E2E_MARKS: dict = {}  # e.g. {"spo": [UNTUNED]} for a config not yet tuned


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=E2E_MARKS.get(n, [])) for n in E2E])
def test_method_raises_classifier_reward_on_digits(tmp_path, name):
    # TailorPO varies a lot between seeds (the bench: seed 0 lowers the training reward, seeds 1 and 2
    # raise it a lot), so its claim is the bench's measurement: the mean over three seeds on the bench's
    # 200 evaluation samples. (On 60 samples the mean gain is -0.006: too few to see it.) The other
    # methods hold on seed 0 and 60 samples.
    gains = []
    per_prompt = 20 if name in SEEDS else 6
    for seed in SEEDS.get(name, [0]):
        cfg, args = resolve_config(ROOT / "configs" / f"{name}_digits.yaml",
                                   [f"eval.per_prompt={per_prompt}", f"seed={seed}", *E2E[name]])
        s = train(cfg, args, tmp_path / f"digits-{seed}")
        gains.append(s["final_reward_mean"] - s["base_reward_mean"])
    assert sum(gains) / len(gains) > 0.02, gains
