"""∇-GFlowNet (residual ∇-DB): terms by hand, where their gradients go, end to end."""

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.losses.nabla_db import gaussian_scores, residual_db_loss
from diffalign.methods import nabla_gfn
from diffalign.methods.nabla_gfn import NablaGFN
from diffalign.models.base import DiffusionModel
from diffalign.sampler import Sampler
from diffalign.train import Trainer, resolve_config, train

TOY = {"method": "nabla-gfn", "model": "toy2d", "reward": "quadratic", "prompts": [""], "sampling": {"num_steps": 10},
       "train": {"epochs": 1, "batch_size": 8, "batches_per_epoch": 1}, "eval": {"reward": None, "per_prompt": 16},
       "args": {"train_fraction": 0.3}}


def _terms(tr):
    """Collect one batch and return every term of the first micro-step's loss."""
    with torch.no_grad():
        batch, _ = tr.method.collect(0)
    loss, info = next(iter(tr.method.micro_steps(batch))).compute()
    return batch, loss, info


def test_every_term_is_exactly_zero_at_the_start_with_a_constant_reward(tmp_path):
    """θ equal to the reference (LoRA B = 0), g_φ = 0 (zero output layer), ∇ log R = 0: the
    forward, reverse and terminal terms and the output regulariser all vanish exactly."""
    cfg, a = resolve_config(base=dict(TOY, reward="custom_reward:make_constant"))
    tr = Trainer(cfg, a, tmp_path)
    batch, loss, info = _terms(tr)
    assert batch.transitions.terminal.any() and (~batch.transitions.terminal).any()
    assert torch.count_nonzero(batch.transitions.reward_prev) == 0
    for k in ("forward", "reverse", "terminal_flow", "output_reg"):
        assert info[k].item() == 0.0, k
    assert loss.item() == 0.0
    # with the toy's quadratic reward the same start is not at rest: the reward terms drive it
    cfg, a = resolve_config(base=TOY)
    _, loss, info = _terms(Trainer(cfg, a, tmp_path / "q"))
    assert info["forward"] > 0 and info["reverse"] > 0 and info["output_reg"] == 0.0


class Linear(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(k)))

    def forward(self, x, t, c):
        return self.w * x


def _linear_model(k):
    """A 2-D model with eps(x, t) = k x, so every quantity of a DDIM step is in closed form."""
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    return DiffusionModel(name="linear", denoiser=Linear(k), scheduler=s, sample_shape=(2,),
                          encode_prompts=lambda p: None, forward=lambda d, x, t, c: d(x, t, c), decode=lambda x: x)


def test_one_transition_by_hand_on_toy2d():
    """eps = k x gives x0_hat = c_t x, mean = m x_t (c, m scalars); the quadratic reward
    r = -1/2 ||x0 - (2, 2)||² has ∇_x r(x0_hat(x)) = -c (c x - target). The forward and reverse
    terms equal those closed forms."""
    k_pol, k_ref, beta, T = 0.3, 0.2, 0.7, 10
    pol, ref = _linear_model(k_pol), _linear_model(k_ref)
    S = Sampler(num_steps=T, eta=1.0, guidance_scale=1.0)
    ts = S.timesteps(pol)
    S.timesteps(ref)
    ac = pol.scheduler.alphas_cumprod.double()
    target = torch.tensor([2.0, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_t, x_prev = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    i = 4
    t, t_prev = int(ts[i]), int(ts[i + 1])
    a_t, a_p = float(ac[t]), float(ac[t_prev])
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)

    def c(k, a):
        return (1 - math.sqrt(1 - a) * k) / math.sqrt(a)

    def m(k):
        return math.sqrt(a_p) * c(k, a_t) + math.sqrt(1 - a_p - var) * k

    xt, xp = x_t.double(), x_prev.double()
    a_hand = {k: -(xp - m(k) * xt) / var for k in (k_pol, k_ref)}
    b_hand = {k: m(k) * (xp - m(k) * xt) / var for k in (k_pol, k_ref)}
    # the reward is scored at the reference's x0_hat (x0_from: reference, the default)
    s_prev = beta * a_p * (-c(k_ref, a_p) * (c(k_ref, a_p) * xp - target))
    s_t = beta * a_t * (-c(k_ref, a_t) * (c(k_ref, a_t) * xt - target))
    fwd_hand = ((a_hand[k_pol] - a_hand[k_ref] - s_prev) ** 2).mean(1)
    rev_hand = ((b_hand[k_pol] - b_hand[k_ref] + s_t) ** 2).mean(1)

    from diffalign.rewards import build_reward

    quad = build_reward("quadratic")
    run = SimpleNamespace(model=pol, reward=quad, score=lambda images, prompts: quad(images, prompts)[0])

    @contextlib.contextmanager
    def reference():
        run.model = ref
        yield
        run.model = pol

    run.reference = reference
    meth = object.__new__(NablaGFN)
    meth.run, meth.sampler, meth.args = run, S, NablaGFN.Config(beta=beta)
    scores = {}
    for k, model in ((k_pol, pol), (k_ref, ref)):
        x = x_t.clone().requires_grad_(True)
        step = S.step(model, x, ts[i], None, prev_sample=x_prev, with_logprob=False)
        scores[k] = gaussian_scores(step.mean, step.std, x_prev, x, create_graph=False)
    no = torch.zeros(3, dtype=torch.bool)
    r_prev, _ = meth.reward_score(x_prev, torch.full((3,), t_prev), no, None, [""] * 3)
    r_t, _ = meth.reward_score(x_t, torch.full((3,), t), no, None, [""] * 3)
    torch.testing.assert_close(r_prev.double(), s_prev, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_t.double(), s_t, rtol=1e-4, atol=1e-5)
    for k in (k_pol, k_ref):
        torch.testing.assert_close(scores[k][0].double(), a_hand[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(scores[k][1].double(), b_hand[k], rtol=1e-4, atol=1e-4)
    zero = torch.zeros(3, 2)
    per, info = residual_db_loss(*scores[k_pol][:1], scores[k_ref][0], scores[k_pol][1], scores[k_ref][1], r_prev, r_t,
                                 zero, zero, no)
    torch.testing.assert_close(per.double(), fwd_hand + rev_hand, rtol=1e-4, atol=1e-4)
    # the last transition: the reward of x_0 itself (γ = 1), no flow term, ||g(x_0)||² as a penalty
    end = torch.ones(3, dtype=torch.bool)
    r_end, _ = meth.reward_score(x_prev, torch.full((3,), -1), end, None, [""] * 3)
    torch.testing.assert_close(r_end.double(), beta * -(xp - target), rtol=1e-5, atol=1e-6)
    flow = torch.full((3, 2), 0.5)
    per_end, _ = residual_db_loss(scores[k_pol][0], scores[k_ref][0], scores[k_pol][1], scores[k_ref][1], r_end, r_t,
                                  flow, zero, end)
    want = ((scores[k_pol][0] - scores[k_ref][0] - r_end) ** 2).mean(1) + ((scores[k_pol][1] - scores[k_ref][1] + r_t) ** 2).mean(1) + 0.25
    torch.testing.assert_close(per_end, want)


def test_the_reverse_term_reaches_the_lora_and_the_flow(tmp_path, monkeypatch):
    """The reverse term alone (the forward term and regulariser switched off) has a gradient on the
    LoRA (b_θ is differentiated with create_graph) and on g_φ. Without create_graph, as in the public
    code, the LoRA would get none."""
    cfg, a = resolve_config(base=dict(TOY, args=dict(TOY["args"], output_reg=0.0)))
    tr = Trainer(cfg, a, tmp_path)
    with torch.no_grad():
        batch, _ = tr.method.collect(0)
    for p in tr.params["flow"]:  # a non-zero g_φ, so its gradient also reaches the layers before the output
        torch.nn.init.normal_(p, std=0.1) if p.ndim > 1 else None

    def reverse_only(a, a_ref, b, b_ref, reward_prev, reward_t, flow_prev, flow_t, terminal, reverse_weight=1.0,
                     weight=None, flow_weight=None):
        rev = ((b - (b_ref - reward_t - flow_t)) ** 2).flatten(1).mean(1)
        return rev, {}

    monkeypatch.setattr(nabla_gfn, "residual_db_loss", reverse_only)
    loss, _ = next(iter(tr.method.micro_steps(batch))).compute()
    loss.backward()
    lora_b = [p.grad for n, p in tr.run.model.denoiser.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lora_b)
    assert all(p.grad is not None for p in tr.params["flow"]) and any(p.grad.abs().sum() > 0 for p in tr.params["flow"])
    # the public code's variant: b without create_graph carries no graph to the LoRA
    x = batch.transitions.x_t[:2].clone().requires_grad_(True)
    step = tr.sampler.step(tr.run.model, x, batch.transitions.t[:2], None, prev_sample=batch.transitions.x_prev[:2],
                           with_logprob=False)
    _, b = gaussian_scores(step.mean, step.std, batch.transitions.x_prev[:2], x, create_graph=False)
    assert not b.requires_grad


def test_refuses_a_non_differentiable_reward_and_a_non_positive_log(tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="needs a differentiable reward, but 'compressibility'"):
        Trainer(*resolve_config(base=dict(TOY, model="digits", reward="compressibility", prompts=["1"])), tmp_path)
    cfg, a = resolve_config(base=dict(TOY, args=dict(TOY["args"], log_reward="log")))
    with pytest.raises(ValueError, match="log needs a positive reward, but 'quadratic'"):
        with torch.no_grad():
            Trainer(cfg, a, tmp_path / "l").method.collect(0)


def test_subsampled_transitions_always_include_the_last():
    from diffalign.processes import Processes
    from diffalign.seeding import Seeds

    run = SimpleNamespace(cfg=SimpleNamespace(seed=0, train=SimpleNamespace(batch_size=5)),
                          generator=Seeds(0, Processes.single(), [""]).generator)
    meth = object.__new__(NablaGFN)
    meth.run, meth.args = run, NablaGFN.Config(train_fraction=0.2)
    steps = meth.trained_steps(0, 0, 20)  # 4 per trajectory: 3 blocks of the first 19 steps + the last
    assert steps.shape == (5, 4) and (steps[:, -1] == 19).all()
    for j, block in enumerate(torch.tensor_split(torch.arange(19), 3)):
        assert all(int(s) in block.tolist() for s in steps[:, j])
    assert len({tuple(r.tolist()) for r in steps}) > 1  # drawn per trajectory


def test_split_weighting_scales_the_policy_and_the_flow_gradients_separately():
    """weight w on the policy's residuals, flow_weight on g_φ's: each gradient is the plain loss's
    gradient times its own weight, and the fixed point (all residuals 0) is the same."""
    torch.manual_seed(0)
    n = 4
    leaves = {k: torch.randn(n, 2, requires_grad=True) for k in ("a", "b", "flow_prev", "flow_t")}
    fixed = {k: torch.randn(n, 2) for k in ("a_ref", "b_ref", "reward_prev", "reward_t")}
    terminal = torch.tensor([False, False, True, False])
    w = torch.tensor([0.5, 2.0, 1e-3, 1.0])

    def grads(**kw):
        for v in leaves.values():
            v.grad = None
        per, info = residual_db_loss(leaves["a"], fixed["a_ref"], leaves["b"], fixed["b_ref"], fixed["reward_prev"],
                                     fixed["reward_t"], leaves["flow_prev"], leaves["flow_t"], terminal, 0.7, **kw)
        per.sum().backward()
        return {k: v.grad.clone() for k, v in leaves.items()}, info

    plain, info_plain = grads()
    split, info_split = grads(weight=w)
    col = w.view(-1, 1)
    torch.testing.assert_close(split["a"], col * plain["a"])
    torch.testing.assert_close(split["b"], col * plain["b"])
    # the terminal penalty on g(x_0) is not weighted; g's residual terms are (flow_weight None = 1)
    torch.testing.assert_close(split["flow_prev"], plain["flow_prev"])
    torch.testing.assert_close(split["flow_t"], plain["flow_t"])
    both, _ = grads(weight=w, flow_weight=w)
    torch.testing.assert_close(both["flow_t"], col * plain["flow_t"])
    assert info_split["forward"] == info_plain["forward"] and info_split["reverse"] == info_plain["reverse"]


def test_reward_scores_use_the_reference_x0_hat_unless_told(tmp_path):
    """x0_from: reference makes β γ ∇ log R(x0_hat) a fixed function of x, whatever the policy does."""
    cfg, a = resolve_config(base=TOY)
    tr = Trainer(cfg, a, tmp_path)
    x = torch.randn(5, 2)
    t = torch.full((5,), int(tr.sampler.timesteps(tr.run.model)[3]))
    no = torch.zeros(5, dtype=torch.bool)
    before, _ = tr.method.reward_score(x, t, no, None, [""] * 5)
    with torch.no_grad():
        for n, p in tr.run.model.denoiser.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    after_ref, _ = tr.method.reward_score(x, t, no, None, [""] * 5)
    tr.method.args.x0_from = "policy"
    after_pol, _ = tr.method.reward_score(x, t, no, None, [""] * 5)
    torch.testing.assert_close(after_ref, before)
    assert (after_pol - before).abs().max() > 1e-3


def test_a_sample_costs_two_queries_per_trained_transition_and_its_reward_comes_with_them(tmp_path):
    """TOY trains round(0.3 · 10) = 3 transitions per trajectory: 2 reward-gradient evaluations each,
    and the sample's reward is the one at x_0 (no extra query)."""
    cfg, a = resolve_config(base=TOY)
    tr = Trainer(cfg, a, tmp_path)
    q0 = tr.run.reward_queries
    with torch.no_grad():
        batch, metrics = tr.method.collect(0)
    assert tr.run.reward_queries - q0 == 8 * 3 * 2
    end = batch.transitions.terminal
    assert int(end.sum()) == 8 and torch.equal(batch.transitions.t_prev[end], torch.zeros(8, dtype=batch.transitions.t_prev.dtype))
    final = tr.run.score(batch.transitions.x_prev[end], [""] * 8)
    assert metrics["reward_mean"] == pytest.approx(float(final.mean()), abs=1e-6)


@pytest.mark.parametrize("method", ["nabla-gfn", "dpok"])
def test_runs_on_digits_with_its_unet_field_network(tmp_path, method):
    """The digits field network is a small UNet with attention: the reverse term differentiates
    through it twice (create_graph), which the fused attention kernels cannot do; the run must
    go through and checkpoint the second module."""
    cfg, a = resolve_config(base={"method": method, "model": "digits", "reward": "classifier", "prompts": ["3", "8"],
                                  "sampling": {"num_steps": 4, "guidance_scale": 1.0},
                                  "train": {"epochs": 1, "batch_size": 4, "batches_per_epoch": 1},
                                  "eval": {"reward": None, "per_prompt": 2}})
    s = train(cfg, a, tmp_path / "run")
    assert s["finished"]
    names = {p.name for p in (tmp_path / "run" / "checkpoints").rglob("*.safetensors")}
    assert any(("flow" if method == "nabla-gfn" else "value") in n for n in names), names


def test_logged_loss_is_the_sum_of_the_trained_residuals():
    """With split weights the terminal forward residual reaches θ only (its target has no g_φ): the value
    is w·(forward + λ·reverse) + (non-terminal forward + λ·reverse) on g_φ's side + the penalty, with no
    term that has no gradient, and the info splits terminal from non-terminal residuals."""
    torch.manual_seed(1)
    n, lam = 4, 0.7
    leaves = {k: torch.randn(n, 2, requires_grad=True) for k in ("a", "b", "flow_prev", "flow_t")}
    fixed = {k: torch.randn(n, 2) for k in ("a_ref", "b_ref", "reward_prev", "reward_t")}
    terminal = torch.tensor([False, True, True, False])
    w = torch.tensor([0.5, 1e-3, 2e-3, 1.0])
    per, info = residual_db_loss(leaves["a"], fixed["a_ref"], leaves["b"], fixed["b_ref"], fixed["reward_prev"],
                                 fixed["reward_t"], leaves["flow_prev"], leaves["flow_t"], terminal, lam, weight=w)
    a, b, fp, ft = (leaves[k].detach() for k in ("a", "b", "flow_prev", "flow_t"))
    end = terminal.float().view(-1, 1)
    fwd = ((a - fixed["a_ref"] - fixed["reward_prev"] - (1 - end) * fp) ** 2).mean(1)
    rev = ((b - fixed["b_ref"] + fixed["reward_t"] + ft) ** 2).mean(1)
    pen = (fp ** 2).mean(1) * terminal.float()
    want = w * (fwd + lam * rev) + (1 - terminal.float()) * fwd + lam * rev + pen
    torch.testing.assert_close(per.detach(), want)
    assert info["forward"] == pytest.approx(float(fwd[~terminal].mean()))
    assert info["forward_terminal"] == pytest.approx(float(fwd[terminal].mean()))
    assert info["reverse_terminal"] == pytest.approx(float(rev[terminal].mean()))
    assert float(info["policy_part"] + info["flow_part"]) == pytest.approx(float((per - pen).detach().mean()), rel=1e-5)


def test_the_terminal_residual_stays_small_on_a_flow_model(tmp_path):
    """On toy2d-flow with a fast flow network (flow_lr 1e-2): on the scheduler's own grid (last step σ 0.001 -> 0)
    the terminal forward residual is ~10³ from the first epoch and the runs diverge; on the sampler's grid it
    is below 2 (measured 0.6-0.8 on 3 seeds)."""
    cfg, args = resolve_config("configs/nabla_gfn_toy2d.yaml", ["model=toy2d-flow", "sampling.eta=0.7",
                                                                 "args.flow_lr=1e-2", "train.epochs=2",
                                                                 "eval.per_prompt=16"])
    train(cfg, args, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terminal = [r["forward_terminal"] for r in rows if "forward_terminal" in r]
    assert len(terminal) == 2 and max(terminal) < 5.0, terminal
