"""D3PO, SPO, TailorPO, TailorPO-G: the shared clipped DPO loss, gradient directions,
branching, guidance, and end-to-end reward gains on digits."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.losses import dpo_loss
from diffalign.methods.preference import step_reward
from diffalign.methods.tailorpo import TailorPO
from diffalign.sampler import Sampler
from diffalign.train import Trainer, resolve_config, train
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
LOG2 = math.log(2.0)

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
    p = data.pairs
    if method in ("spo", "tailorpo") and args.get("same_condition", True):
        assert torch.equal(p.x_t_w, p.x_t_l)  # same condition
    if method == "d3po" or not args.get("same_condition", True):
        assert not torch.equal(p.x_t_w, p.x_t_l)


def test_d3po_skips_ties(tmp_path):
    cfg, a = resolve_config(base=dict(TOY, method="d3po"))
    tr = Trainer(cfg, a, tmp_path)
    tr.run.score = lambda images, prompts, metadata=None: torch.zeros(len(prompts))  # every pair tied
    with torch.no_grad():
        data, m = tr.method.collect(0)
    assert data.pairs is None and list(tr.method.micro_steps(data)) == []


def test_tailorpo_g_refuses_non_differentiable_reward(tmp_path):
    cfg, a = resolve_config(base=dict(TOY, method="tailorpo-g", model="digits", reward="compressibility"))
    with pytest.raises(ConfigError, match="differentiable"):
        Trainer(cfg, a, tmp_path)


# ---- gradient direction (METHODS.md Eq. 11) ------------------------------------------
SAMPLER = Sampler(num_steps=10, eta=1.0, guidance_scale=1.0, reduction="sum")


def _setup():
    m = tiny_model()
    m.scheduler.set_timesteps(10)
    t = m.scheduler.timesteps[3]
    cond = torch.tensor([0, 1])
    return m, copy.deepcopy(m), t, cond


def _mean(m, x_t, t, cond):
    with torch.no_grad():
        return SAMPLER.step(m, x_t, t, cond, prev_sample=x_t).mean


def _sgd_step(m, ref, x_t_w, x_t_l, x_w, x_l, t, cond, params, lr):
    with torch.no_grad():
        rw = SAMPLER.logprob(ref, x_t_w, t, cond, x_w)
        rl = SAMPLER.logprob(ref, x_t_l, t, cond, x_l)
    lw = SAMPLER.logprob(m, x_t_w, t, cond, x_w)
    ll = SAMPLER.logprob(m, x_t_l, t, cond, x_l)
    loss = dpo_loss(lw - rw, ll - rl, beta=0.1, clip=0.5)[0].mean()
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


# ---- branching and guidance on a tiny model, with a stand-in run ---------------------
def _fake(reward_fn, cls=TailorPO, **args):
    m = tiny_model()
    calls = []

    def score(images, prompts, metadata=None):
        calls.append(len(prompts))
        return reward_fn(images)

    run = SimpleNamespace(model=m, score=score, device="cpu", own=lambda x: x,
                          generator=lambda *parts: torch.Generator().manual_seed(0))
    meth = object.__new__(cls)
    meth.run, meth.args, meth.sampler = run, cls.Config(**args), SAMPLER
    return meth, calls


def _slot(prompts, generators):
    """One rollout batch held whole by one process."""
    from diffalign.seeding import Slot

    return Slot(0, prompts, prompts, torch.arange(len(prompts)), generators)


def test_branching_children_share_x_t_and_winner_continues():
    meth, calls = _fake(lambda im: im.flatten(1).mean(1))  # brighter is better
    meth.steps = [0, 5]
    prompts = ["0", "1", "2"]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    traj, pairs, branches = meth.rollout(_slot(prompts, gens), log={})
    assert len(branches) == 2 and len(calls) == 2 * 2 + 0 and sum(calls) == 2 * 2 * 3  # 2 children scored per step
    rows = torch.arange(3)
    for br in branches:
        assert torch.equal(br.x_t, traj.latents[:, br.step])  # both children come from this x_t
        assert torch.equal(br.chosen, br.scores.argmax(1))
        assert torch.equal(traj.latents[:, br.step + 1], br.children[rows, br.chosen])  # the winner continued
    keep = [br.scores.max(1).values != br.scores.min(1).values for br in branches]
    assert len(pairs) == 2 and all(len(p) == int(k.sum()) for p, k in zip(pairs, keep))
    assert torch.equal(pairs[0].x_t_w, pairs[0].x_t_l)  # same condition
    # every stored log-prob is the re-scored transition (ratio 1)
    for i in range(traj.num_steps):
        torch.testing.assert_close(SAMPLER.rescore(meth.run.model, traj, i), traj.log_probs[:, i])


def test_guided_winner_continues_with_its_own_log_prob():
    """TailorPO-G moves the winner: the rollout stores the moved state's log-prob, not the child's."""
    target = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    meth, _ = _fake(lambda im: -((im - target) ** 2).flatten(1).sum(1), guidance=True, eta_min=0.5, eta_max=1.0)
    meth.steps = [6, 8]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    log = {}
    traj, pairs, branches = meth.rollout(_slot(["0", "1"], gens), log=log)
    moved = torch.stack(log["guided"])
    assert moved.sum() > 0
    rows = torch.arange(2)
    for br, p, m in zip(branches, pairs, log["guided"]):
        unguided = br.children[rows, br.chosen]
        assert m == 0 or not torch.equal(traj.latents[:, br.step + 1], unguided)  # the guided state continued ...
        keep = br.scores.max(1).values != br.scores.min(1).values
        torch.testing.assert_close(p.x_w, traj.latents[:, br.step + 1][keep])  # ... and is the pair's winner
    for i in range(traj.num_steps):
        torch.testing.assert_close(SAMPLER.rescore(meth.run.model, traj, i), traj.log_probs[:, i])


def test_guidance_raises_winner_reward_and_zero_gradient_changes_nothing():
    target = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    meth, calls = _fake(lambda im: -((im - target) ** 2).flatten(1).sum(1), guidance=True, eta_min=0.5, eta_max=1.0)
    ts = SAMPLER.timesteps(meth.run.model)
    prompts = ["0", "1"]
    cond = meth.run.model.encode_prompts(prompts)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.no_grad():
        r0 = step_reward(meth.run, SAMPLER, x, 6, ts, cond, prompts)
        x_new, r_new, moved = meth.guide(x, 6, cond, prompts, ts, r0)
    assert moved.all() and (r_new > r0).all()
    assert not torch.equal(x_new, x)
    # zero reward gradient: nothing moves
    meth0, _ = _fake(lambda im: im.sum((1, 2, 3)) * 0.0, guidance=True)
    with torch.no_grad():
        r0 = step_reward(meth0.run, SAMPLER, x, 6, ts, cond, prompts)
        x0, r0b, moved0 = meth0.guide(x, 6, cond, prompts, ts, r0)
    assert not moved0.any() and torch.equal(x0, x) and torch.equal(r0b, r0)
    # cosine schedule: larger steps at small t
    assert meth.eta_schedule(0) == pytest.approx(1.0) and meth.eta_schedule(1000) == pytest.approx(0.5)
    assert meth.eta_schedule(100) > meth.eta_schedule(800)


def test_spo_pairs_best_worst_gap_and_random_continuation():
    from diffalign.methods.spo import SPO

    spo, calls = _fake(lambda im: im.flatten(1).mean(1) * 20, cls=SPO, k=4, threshold=0.3, temperature=1.0,
                       single_path_steps=6)
    prompts = ["0", "1", "2"] * 4
    gens = [torch.Generator().manual_seed(i) for i in range(12)]
    traj, pairs, branches = spo.rollout(_slot(prompts, gens), epoch=0)
    assert sum(calls) == 4 * 4 * 12  # every candidate scored through run.score
    not_best, rows = 0, torch.arange(12)
    for br, p in zip(branches, pairs):
        s = br.scores
        keep = (torch.softmax(s, 1).max(1).values - torch.softmax(s, 1).min(1).values) > 0.3
        assert len(p) == int(keep.sum())
        torch.testing.assert_close(p.x_w, br.children[rows, s.argmax(1)][keep])
        torch.testing.assert_close(p.x_l, br.children[rows, s.argmin(1)][keep])
        assert torch.equal(traj.latents[:, br.step + 1], br.children[rows, br.chosen])
        not_best += int((br.chosen != s.argmax(1)).sum())
    assert not_best > 0  # continuation is random, not the best
    for i in range(traj.num_steps):
        torch.testing.assert_close(SAMPLER.rescore(spo.run.model, traj, i), traj.log_probs[:, i])


# ---- end to end ------------------------------------------------------------------------
UNTUNED = pytest.mark.xfail(strict=False, reason="digits config not yet tuned/verified to raise the reward in 4 epochs")
E2E = {
    "d3po": [],  # the config's 32 epochs (the bench budget): 12 epochs gain 0.004 on average over 3 seeds
    "spo": [],
    "tailorpo": [],
    "tailorpo_g": [],
}
SEEDS = {"tailorpo": [0, 1, 2], "d3po": [0, 1]}
E2E_MARKS: dict = {}  # e.g. {"spo": [UNTUNED]} for a config not yet tuned


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=E2E_MARKS.get(n, [])) for n in E2E])
def test_method_raises_classifier_reward_on_digits(tmp_path, name):
    # TailorPO varies a lot between seeds (the bench: seed 0 lowers the training reward, seeds 1 and 2
    # raise it a lot), so its claim is the bench's measurement: the mean over three seeds on the bench's
    # 200 evaluation samples. (On 60 samples the mean gain is -0.006: too few to see it.) The other
    # methods hold on seed 0 and 60 samples; D3PO's gain is measured on two seeds (seed 0 alone: +0.025). TailorPO-G is
    # measured on the bench's 200 samples: on 60, seed 0 gains 0.004 in mean reward (win rate 0.78; 0.068 on 200).
    gains = []
    per_prompt = 20 if name in ("tailorpo", "tailorpo_g") else 6
    for seed in SEEDS.get(name, [0]):
        cfg, args = resolve_config(ROOT / "configs" / f"{name}_digits.yaml",
                                   [f"eval.per_prompt={per_prompt}", f"seed={seed}", *E2E[name]])
        s = train(cfg, args, tmp_path / f"digits-{seed}")
        gains.append(s["final_reward_mean"] - s["base_reward_mean"])
    assert sum(gains) / len(gains) > 0.02, gains


@pytest.mark.parametrize("method, args", [("d3po", {}), ("tailorpo-g", {"train_steps": [4, 2]})])
def test_unset_guidance_on_a_guided_model_is_the_models_default(tmp_path, method, args):
    """sampling.guidance_scale unset on digits (classifier-free guidance 2.0): the Sampler resolves the
    model's default once, so pair collection, step rewards, the loss and the final KL all use 2.0
    (they used to receive None and crash)."""
    cfg, a = resolve_config(base={"method": method, "model": "digits", "prompts": ["3", "8"], "sampling": {"num_steps": 4},
                                  "train": {"epochs": 1, "batch_size": 4, "batches_per_epoch": 1},
                                  "eval": {"reward": None, "per_prompt": 2}, "args": args})
    assert cfg.sampling.guidance_scale is None
    tr = Trainer(cfg, a, tmp_path / "t")
    assert tr.sampler.guidance_scale == 2.0
    s = train(cfg, a, tmp_path / "run")
    assert s["finished"] and s["final"]["kl"] > 0


def test_d3po_step_subsets_follow_the_run_seed_and_can_be_per_sample():
    from diffalign.methods.d3po import D3PO
    from diffalign.processes import Processes
    from diffalign.seeding import Seeds

    def steps(seed, per_sample):
        seeds = Seeds(seed, Processes.single(), [""])  # the real seeding, on a stand-in run
        run = SimpleNamespace(cfg=SimpleNamespace(seed=seed, train=SimpleNamespace(batch_size=6)),
                              generator=seeds.generator)
        meth = object.__new__(D3PO)
        meth.run, meth.args = run, D3PO.Config(timestep_fraction=0.5, per_sample_timesteps=per_sample)
        return torch.stack(meth.trained_steps(epoch=3, batch=0, T=20), 1)  # (batch, steps)

    a, b, c = steps(0, False), steps(0, False), steps(1, False)
    assert a.shape == (6, 10) and torch.equal(a, b) and not torch.equal(a, c)  # seeded by the run seed
    assert all(torch.equal(row, a[0]) for row in a)  # one subset for the batch
    p = steps(0, True)
    assert p.shape == (6, 10) and len({tuple(r.tolist()) for r in p}) > 1  # one subset per sample
    assert all(len(set(r.tolist())) == 10 for r in p)
