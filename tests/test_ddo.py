"""DDO: the dual-averaging math on exact grids, the Doob h-transform sampler against closed
forms and against toy2d's exact optimum, and the method end to end."""

import json
import math

import pytest
import torch
from torch import nn

from diffalign.config import ConfigError
from diffalign.doob import DoobCorrection, tilted_shift
from diffalign.losses import ddo as da
from diffalign.methods import resolve_config
from diffalign.models.base import DiffusionModel
from diffalign.sampler import Sampler
from diffalign.train import train


# ---- dual averaging on a grid -----------------------------------------------------------------
def grid():
    x = torch.linspace(-4, 4, 161, dtype=torch.float64)
    p = 0.6 * torch.exp(-0.5 * ((x + 1.5) / 0.5) ** 2) + 0.4 * torch.exp(-0.5 * ((x - 1.0) / 0.8) ** 2)
    return x, p / p.sum()


def q_of(f, p):
    q = p * torch.exp(-(f - f.min()))
    return q / q.sum()


def reference_iterates(first_variation, p, beta, beta_prime, option, iters):
    """Dual averaging written as explicit sums (no recurrence): g^(k) = Σ w_j δL(q_j) / (β W_k + β')."""
    qs, f = [], torch.zeros_like(p)
    acc, wsum = torch.zeros_like(p), 0.0
    for k in range(1, iters + 1):
        q = q_of(f, p)
        qs.append(q)
        w = 1.0 if option == 1 else float(k)
        acc, wsum = acc + w * first_variation(q), wsum + w
        f = acc / (beta * wsum + beta_prime)
    return qs


def implementation_iterates(first_variation, p, beta, beta_prime, option, iters):
    """The method's recurrence (da_target) with the regression replaced by exact assignment."""
    qs, f = [], torch.zeros_like(p)
    for k in range(1, iters + 1):
        q = q_of(f, p)
        qs.append(q)
        f = da.da_target(f, first_variation(q), k, option, beta, beta_prime)
    return qs


def reward_fv(x):
    r = -0.5 * (x - 2.0) ** 2
    return lambda q: da.reward_first_variation(r), r


def dpo_fv(x, p, gamma=1.0):
    r = -0.5 * (x - 2.0) ** 2
    return lambda q: da.dpo_population_first_variation(torch.log(q / p), r, p, gamma), r


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("objective", ["reward", "dpo"])
def test_recurrence_matches_the_explicit_dual_averaging_sums(objective, option):
    x, p = grid()
    fv = reward_fv(x)[0] if objective == "reward" else dpo_fv(x, p)[0]
    ref = reference_iterates(fv, p, 0.5, 0.7, option, 8)
    imp = implementation_iterates(fv, p, 0.5, 0.7, option, 8)
    for a, b in zip(ref, imp):
        assert torch.allclose(a, b, atol=1e-12)
    assert (ref[-1] - ref[0]).abs().sum() > 0.1  # the iterates moved


@pytest.mark.parametrize("option", [1, 2])
def test_reward_iterates_converge_to_the_tilted_optimum(option):
    x, p = grid()
    fv, r = reward_fv(x)
    beta = 0.5
    star = p * torch.exp(r / beta)
    star = star / star.sum()
    qs = implementation_iterates(fv, p, beta, beta, option, 400)
    tv = [0.5 * (q - star).abs().sum() for q in qs]
    assert tv[-1] < 0.02 and tv[-1] < tv[10] < tv[0]
    if option == 2:  # linear weights: the tilt is k(k+1)/(k(k+1)+2) of the optimum's, faster than k/(k+1)
        q1 = implementation_iterates(fv, p, beta, beta, 1, 20)[-1]
        assert 0.5 * (qs[19] - star).abs().sum() < 0.5 * (q1 - star).abs().sum()


def test_dpo_iterates_reach_the_first_order_condition_of_F():
    x, p = grid()
    fv, r = dpo_fv(x, p)
    beta = 0.5
    qs = implementation_iterates(fv, p, beta, beta, 2, 300)

    def residual(q):  # δL/δq + β log q/p_ref is constant on the support at the optimum
        g = fv(q) + beta * torch.log(q / p)
        mean = (q * g).sum()
        return float(((q * (g - mean) ** 2).sum()).sqrt())

    def objective(q):
        h = torch.log(q / p)
        dr, dh = r[:, None] - r[None, :], h[:, None] - h[None, :]
        lp = torch.sigmoid(dr) * torch.nn.functional.logsigmoid(dh)
        # ordered pairs (y, x′) ~ p_ref²: both orders of a pair are in the sum, hence the 2
        return float(-2 * (p[:, None] * p[None, :] * lp).sum() + beta * (q * h).sum())

    assert residual(qs[-1]) < 1e-3 < residual(qs[0])
    assert objective(qs[-1]) < objective(qs[5]) < objective(qs[0])
    # the DPO optimum (γ = 1, Bradley–Terry on r) leans towards high reward, and the KL holds it short of p_ref·e^r
    mean_r = [float((q * r).sum()) for q in (p, qs[-1])]
    star = p * torch.exp(r)
    assert mean_r[0] < mean_r[1] < float((star / star.sum() * r).sum())


@pytest.mark.parametrize("objective", ["reward", "dpo"])
def test_centring_the_targets_leaves_every_iterate_unchanged(objective):
    """`center_targets`: f's constant does not change q, and the recurrence carries it along."""
    x, p = grid()
    fv = reward_fv(x)[0] if objective == "reward" else dpo_fv(x, p)[0]
    plain = implementation_iterates(fv, p, 0.5, 0.5, 2, 8)
    qs, f = [], torch.zeros_like(p)
    for k in range(1, 9):
        q = q_of(f, p)
        qs.append(q)
        f = da.da_target(f, fv(q), k, 2, 0.5, 0.5)
        f = f - f.mean()
    for a, b in zip(plain, qs):
        assert torch.allclose(a, b, atol=1e-12)


def test_the_per_pair_dpo_estimate_averages_to_the_population_first_variation():
    x, p = grid()
    r = -0.5 * (x - 2.0) ** 2
    h = torch.log(q_of(0.3 * torch.sin(x), p) / p)
    exact = da.dpo_population_first_variation(h, r, p, 1.5)
    y = 40  # one point y; its partner x' ~ p_ref and the label drawn by Bradley–Terry
    hy, hx = h[y].expand_as(h), h
    win_w, _ = da.dpo_first_variation(hy, hx, 1.5)  # y won against x'
    _, lose_l = da.dpo_first_variation(hx, hy, 1.5)  # y lost against x'
    pw = torch.sigmoid(r[y] - r)
    expected = (p * (pw * win_w + (1 - pw) * lose_l)).sum()
    assert math.isclose(float(expected), float(exact[y]), rel_tol=1e-9)


def test_hand_worked_weights_targets_and_signs():
    # Option 1: S_k = βk + β'; Option 2: S_k = βk(k+1)/2 + β'
    assert da.da_scale(3, 1, 0.5, 0.5) == 2.0 and da.da_scale(3, 2, 0.5, 0.5) == 3.5
    # g^(2) = (S_1 g^(1) + w_2 δL) / S_2: Option 2 with β = β' = 1: S_1 = 2, S_2 = 4, w_2 = 2
    assert float(da.da_target(torch.tensor(1.0), torch.tensor(-3.0), 2, 2, 1.0, 1.0)) == pytest.approx((2 - 6) / 4)
    assert float(da.reward_first_variation(torch.tensor(50.0))) == -20.0  # clipped at the paper's 20
    # DPO at h = 0: s = σ(0) = 1/2, so δL/δq = ∓2γ·1·(1/2) = ∓γ; the winner's potential goes down (more mass)
    gw, gl = da.dpo_first_variation(torch.tensor([0.0]), torch.tensor([0.0]), 0.3)
    assert float(gw) == pytest.approx(-0.3) and float(gl) == pytest.approx(0.3)
    # KTO at h = z = 0.2: σ'(0) = 1/4, so δL/δq = ∓γλ·exp(−h)/4
    k = da.kto_first_variation(torch.tensor([0.2, 0.2]), torch.tensor([True, False]), 2.0, 0.2, 1.0, 3.0)
    assert torch.allclose(k, torch.tensor([-0.5, 1.5]) * math.exp(-0.2))


# ---- the Doob h-transform -------------------------------------------------------------------------
def test_tilted_shift_is_the_difference_of_posterior_means_hand_worked():
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000)
    a = float(sch.alphas_cumprod[500])
    x0s = torch.tensor([[[0.0], [2.0]]])  # (B=1, M=2, 1)
    log_w = torch.tensor([[0.0, math.log(3.0)]])  # weights 1/4, 3/4: tilted mean 1.5, plain mean 1.0
    d = tilted_shift(sch, 500, torch.zeros(1, 1), x0s, log_w)
    assert float(d) == pytest.approx(math.sqrt(a) / (1 - a) * 0.5, rel=1e-6)
    assert float(tilted_shift(sch, 500, torch.zeros(1, 1), x0s, torch.zeros(1, 2))) == 0.0


def gaussian_model(s2: float):
    """A DiffusionModel whose denoiser is exact for data N(0, s2·I) in 2-D."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    def forward(den, x, t, cond):
        a = sch.alphas_cumprod.to(x.device)[t.long()].view(-1, 1).to(x.dtype)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)  # eps = -sqrt(1 - a)·score

    return DiffusionModel("gauss", nn.Linear(1, 1), sch, (2,), lambda p: None, forward, lambda x: x)


@pytest.mark.parametrize("estimator", ["gaussian", "continuation"])
def test_correction_matches_the_closed_form_for_gaussian_data_and_a_linear_potential(estimator):
    # p_ref = N(0, s2), f(x) = -c·x: h_t(x) = E[exp(c·X0) | x_t], ∇ log h_t = c·√ā s2 / (ā s2 + 1 − ā)
    s2, c = 0.8, torch.tensor([0.7, -0.4])
    model = gaussian_model(s2)
    # continuations along coarse DDPM steps under-disperse the particles (each step ignores x0's
    # uncertainty): 20 steps give 0.70 of the exact correction at t = 801; with 500 steps it is
    # within 5% at t = 801 and 401, and 0.92 at t = 101 (the error shrinks like 1 / steps)
    plain = Sampler(num_steps=20 if estimator == "gaussian" else 500, eta=1.0)
    plain.timesteps(model)
    corr = DoobCorrection(lambda x0, cond: -(x0 * c).sum(1), plain.predict, estimator, particles=20000, steps=0,
                          data_var=s2)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for t in (801, 401, 101):
        a = float(model.scheduler.alphas_cumprod[t])
        exact = c * math.sqrt(a) * s2 / (a * s2 + 1 - a)
        got = corr(model, x, torch.tensor(t), None)
        tol = 0.05 if estimator == "gaussian" or t > 101 else 0.1
        assert torch.allclose(got, exact.expand_as(got), atol=tol * float(exact.abs().max())), (t, got, exact)


def test_constant_potential_gives_no_correction():
    model = gaussian_model(1.0)
    plain = Sampler(num_steps=10, eta=1.0)
    plain.timesteps(model)
    corr = DoobCorrection(lambda x0, cond: torch.full((len(x0),), 3.0), plain.predict, "continuation", particles=8)
    assert torch.equal(corr(model, torch.randn(4, 2), torch.tensor(501), None), torch.zeros(4, 2))


def test_doob_sampler_with_the_exact_potential_draws_the_toy2d_optimum():
    """Independent of any learning: f = −r/β makes q = p_ref·exp(r/β)/Z = p*."""
    from diffalign.models import load_model
    from diffalign.models.toy2d import distance_to_optimum
    from diffalign.rewards.toy2d import quadratic

    model = load_model("toy2d", progress=False)
    plain = Sampler(num_steps=20, eta=1.0)
    corrected = plain.replace(correction=DoobCorrection(lambda x0, cond: -quadratic(x0) / 1.0, plain.predict,
                                                        "continuation", particles=32))
    with torch.no_grad():
        base = plain.sample(model, [""] * 500, generator=torch.Generator().manual_seed(0), with_logprob=False).final
        x = corrected.sample(model, [""] * 500, generator=torch.Generator().manual_seed(0), with_logprob=False).final
    d, d_base = distance_to_optimum(x, 1.0), distance_to_optimum(base, 1.0)
    assert d["distance"] <= 1.5 * d["floor"], d
    assert d_base["distance"] > 5 * d["floor"]  # the base is far from p*: the correction did the work


def test_nan_potential_is_a_clear_error():
    model = gaussian_model(1.0)
    plain = Sampler(num_steps=10, eta=1.0)
    plain.timesteps(model)
    corr = DoobCorrection(lambda x0, cond: torch.full((len(x0),), float("nan")), plain.predict, "gaussian")
    with pytest.raises(FloatingPointError, match="potential returned NaN"):
        corr(model, torch.randn(2, 2), torch.tensor(501), None)


# ---- the method -----------------------------------------------------------------------------------
SMALL = {"method": "ddo", "model": "toy2d", "reward": "quadratic", "prompts": [""],
         "train": {"batch_size": 128, "batches_per_epoch": 1, "epochs": 4},
         "eval": {"reward": None, "per_prompt": 300, "beta": 1.0}, "optim": {"lr": 3e-3},
         "args": {"beta": 1.0, "fit_size": 512, "particles": 16}}


def test_ddo_on_toy2d_moves_towards_the_optimum_and_saves_its_potential(tmp_path):
    cfg, args = resolve_config(base=SMALL)
    s = train(cfg, args, tmp_path / "run")
    base, final = s["base"], s["final"]
    assert final["optimum_distance"] < 0.5 * base["optimum_distance"]
    assert s["final_reward_mean"] > s["base_reward_mean"] + 1.0
    assert (tmp_path / "run" / "final" / "potential.safetensors").exists()
    assert not (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").exists()  # the denoiser is untouched
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["potential_mean"] == 0.0 and 0 < rows[1]["doob_ess_fraction"] <= 1


def test_ddo_dpo_learns_from_toy2d_pairs(tmp_path):
    from diffalign.data import feedback
    from diffalign.models import load_model
    from diffalign.rewards import build_reward

    stats = feedback.make_pairs(load_model("toy2d", progress=False), build_reward("quadratic"), [""], 256,
                                tmp_path / "pairs", bt_noise=1.0)
    assert stats["pairs"] == 256 and (tmp_path / "pairs" / "img" / "000000_a.npy").exists()
    spec = dict(SMALL, method="ddo-dpo", args={"data": str(tmp_path / "pairs" / "pairs.jsonl"), "beta": 0.2,
                                               "gamma": 1.0, "particles": 16})
    cfg, args = resolve_config(base=spec)
    s = train(cfg, args, tmp_path / "run")
    assert s["final_reward_mean"] > s["base_reward_mean"] + 0.5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["implicit_accuracy"] > 0.6 and s["reward_queries"] == 0


def test_centred_targets_have_mean_zero_and_still_align(tmp_path):
    spec = dict(SMALL, train=dict(SMALL["train"], epochs=2), args=dict(SMALL["args"], center_targets=True))
    cfg, args = resolve_config(base=spec)
    s = train(cfg, args, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["target_mean"]) < 1e-5 for r in rows)
    assert s["final_reward_mean"] > s["base_reward_mean"] + 1.0


def test_learned_correction_trains_and_samples(tmp_path):
    spec = dict(SMALL, train=dict(SMALL["train"], epochs=2),
                args=dict(SMALL["args"], estimator="learned", reference_samples=512, correction_steps=60,
                          correction_batch=32))
    cfg, args = resolve_config(base=spec)
    s = train(cfg, args, tmp_path / "run")
    assert (tmp_path / "run" / "final" / "correction.safetensors").exists()
    assert s["final_reward_mean"] > s["base_reward_mean"]


@pytest.mark.parametrize("bad, match", [
    ({"beta": 0.0}, "beta' must be > 0"),
    ({"beta": -1.0}, "beta' must be > 0"),
    ({"option": 3}, "must be 1 or 2"),
    ({"estimator": "magic"}, "continuation, gaussian, learned"),
    ({"correction_batch": 0}, "correction_batch' must be >= 1"),
])
def test_bad_settings_are_refused_with_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(base=dict(SMALL, args=bad))


@pytest.mark.parametrize("objective, match", [("dpo", "set 'args.data' to a pairs JSONL"), ("kto", "labels")])
def test_feedback_objective_without_a_file_stops_before_anything_is_written(tmp_path, objective, match):
    cfg, args = resolve_config(base=dict(SMALL, args={"objective": objective}))
    with pytest.raises(ConfigError, match=match):
        train(cfg, args, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_toy2d_reports_the_distance_to_its_own_data_the_practical_limit():
    from diffalign.eval.core import sample_metrics
    from diffalign.models import load_model
    from diffalign.models.toy2d import sample_data
    from diffalign.rewards import build_reward

    model = load_model("toy2d", progress=False)
    data = sample_data(400, torch.Generator().manual_seed(3))
    m = sample_metrics(model, data, [""] * 400, build_reward("quadratic"), 1.0)
    assert m["data_distance"] < 1.6 * m["data_floor"]  # exact data: about the floor
    shifted = sample_metrics(model, data + 0.5, [""] * 400, build_reward("quadratic"), 1.0)
    assert shifted["data_distance"] > 3 * m["data_floor"]


def test_one_timestep_per_row_corrects_each_row_at_its_own_timestep():
    """Re-scoring hands the correction one timestep per row: each row gets the closed-form Δ of its own t
    (not row 0's), and the batched call equals the rows' own calls."""
    s2, c = 0.8, torch.tensor([0.7, -0.4])
    model = gaussian_model(s2)
    plain = Sampler(num_steps=20, eta=1.0)
    plain.timesteps(model)
    corr = DoobCorrection(lambda x0, cond: -(x0 * c).sum(1), plain.predict, "gaussian", particles=20000, data_var=s2)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([801, 101, 401])
    got = corr(model, x, ts, None)
    for i, t in enumerate(ts.tolist()):
        a = float(model.scheduler.alphas_cumprod[t])
        exact = c * math.sqrt(a) * s2 / (a * s2 + 1 - a)
        assert torch.allclose(got[i], exact, atol=0.05 * float(exact.abs().max())), (t, got[i], exact)
        torch.testing.assert_close(got[i:i + 1], corr(model, x[i:i + 1], torch.tensor(t), None))


def test_learned_correction_targets_use_the_guided_prediction():
    """The sampler adds the correction to the guided output, so the regression's x0_hat is the guided one."""
    from diffalign.doob import learned_correction_loss
    from diffalign.sampling import alpha_bar, x0_from_output

    model = gaussian_model(0.8)
    model.null_condition = lambda n: torch.zeros(n, 2)
    exact = model.forward

    def forward(den, x, t, cond):  # the correction net "net" outputs 0; the denoiser depends on its condition
        return torch.zeros_like(x) if den == "net" else exact(den, x, t, cond) + (0.0 if cond is None else 0.3 * cond)

    model.forward = forward
    guided = Sampler(num_steps=10, eta=1.0, guidance_scale=3.0)
    guided.timesteps(model)
    x0, cond = torch.randn(6, 2, generator=torch.Generator().manual_seed(1)), torch.ones(6, 2)
    loss = learned_correction_loss(model, "net", x0, cond, torch.ones(6), model.scheduler.timesteps,
                                   generator=torch.Generator().manual_seed(2), predict=guided.predict)
    g = torch.Generator().manual_seed(2)  # the same draws as the loss: timesteps, then noise
    t = model.scheduler.timesteps[torch.randint(len(model.scheduler.timesteps), (6,), generator=g)]
    x_t = model.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    a = alpha_bar(model.scheduler, t, x_t)
    want = {}
    for name, out in (("guided", guided.predict(model, x_t, t, cond)), ("plain", model.predict_noise(x_t, t, cond))):
        target = a.sqrt() / (1 - a) * (x0 - x0_from_output(model.scheduler, out, t, x_t))
        want[name] = float((target.pow(2).sum(1) * (1 - a).flatten()).mean())
    assert float(loss) == pytest.approx(want["guided"], rel=1e-5)
    assert abs(want["guided"] - want["plain"]) > 1e-3 * want["guided"]
