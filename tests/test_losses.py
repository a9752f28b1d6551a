"""Every loss in diffalign.losses against hand-worked values and its math."""

import math

import pytest
import torch

from diffalign.losses import (denoising_error, dpo_loss, kto_loss, kto_reference_point, logratio_from_errors,
                              ppo_clip_loss)

LOG2 = math.log(2.0)
s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


# ---- PPO clip --------------------------------------------------------------------------
def test_ppo_clip_hand_values():
    # ratios e^0 = 1, e^0.1 = 1.10517, e^-0.1 = 0.904837; clip 0.05 -> [0.95, 1.05]
    lp = torch.tensor([0.0, 0.1, -0.1])
    adv = torch.tensor([1.0, 2.0, -1.0])
    per, info = ppo_clip_loss(lp, torch.zeros(3), adv, clip_range=0.05)
    # per sample max(-A r, -A clip(r)): 1: -1; 2: max(-2*1.10517, -2*1.05) = -2.1; 3: max(0.904837, 0.95) = 0.95
    torch.testing.assert_close(per, torch.tensor([-1.0, -2.1, 0.95]), atol=1e-5, rtol=0)
    assert info["clipfrac"].item() == pytest.approx(2 / 3)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.01) / 3, abs=1e-6)


def test_ppo_ratio_one_gradient_follows_advantage():
    lp = torch.zeros(2, requires_grad=True)
    per, _ = ppo_clip_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=1e-4)
    per.mean().backward()
    # at ratio 1 the loss is -mean(A) and descending raises log-prob of positive advantages
    assert per.mean().item() == pytest.approx(0.0)
    assert lp.grad[0] < 0 < lp.grad[1]


def test_ppo_clipped_ratio_has_no_gradient():
    lp = torch.tensor([0.5], requires_grad=True)  # ratio 1.65 > 1 + eps with positive advantage
    ppo_clip_loss(lp, torch.zeros(1), torch.tensor([1.0]), clip_range=0.1)[0].sum().backward()
    assert lp.grad.item() == 0.0


# ---- DPO: step-level and offline --------------------------------------------------------
def _dpo(lw, ll, beta, clip):
    return dpo_loss(torch.tensor([lw]), torch.tensor([ll]), beta, clip)[0].item()


def test_dpo_hand_values_and_clipping():
    assert _dpo(0.0, 0.0, 0.1, 0.1) == pytest.approx(LOG2)
    # inside the clip: z = beta (0.05 - (-0.02)) = 0.07 -> log(1 + e^-0.07)
    assert _dpo(0.05, -0.02, 1.0, 0.1) == pytest.approx(math.log1p(math.exp(-0.07)), abs=1e-6)
    # clipped: log r_w -> log 1.1, log r_l -> log 0.9, beta 10
    z = 10 * (math.log(1.1) - math.log(0.9))
    assert _dpo(0.5, -0.5, 10.0, 0.1) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)
    # winner ratio clipped at 1 - eps from below
    z = 2 * (math.log(0.9) - 0.03)
    assert _dpo(-3.0, 0.03, 2.0, 0.1) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)
    # no clipping: the raw log-ratios
    assert _dpo(0.5, -0.5, 1.0, None) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    # outside the clip range the gradient vanishes; inside, descending raises the winner's log-ratio
    lw = torch.tensor([0.5], requires_grad=True)
    dpo_loss(lw, torch.zeros(1), 1.0, 0.1)[0].sum().backward()
    assert lw.grad.item() == 0.0
    lw, ll = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    dpo_loss(lw, ll, 1.0, 0.1)[0].sum().backward()
    assert lw.grad.item() == pytest.approx(-0.5) and ll.grad.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip"):
        dpo_loss(torch.zeros(1), torch.zeros(1), 1.0, 1.5)


def test_diffusion_dpo_hand_worked():
    """Wallace et al.: -log σ(-β/2 [(e_w - e_l) - (e_w^ref - e_l^ref)]) from the same function."""
    e_w, e_l = torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2])
    rw, rl = torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2])
    per, info = dpo_loss(logratio_from_errors(e_w, rw), logratio_from_errors(e_l, rl), beta=2.0)
    # pair 1: (0.1 - 0.3) - 0 = -0.2 -> arg = -1 * (-0.2) = 0.2; pair 2: (0.4 - 0.2) - 0 = 0.2 -> arg = -0.2
    torch.testing.assert_close(per, torch.tensor([-math.log(s(0.2)), -math.log(s(-0.2))]), atol=1e-6, rtol=0)
    assert info["accuracy"].item() == 0.5


# ---- KTO ---------------------------------------------------------------------------------
def test_kto_hand_worked_and_reference_point():
    e_theta, e_ref = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])  # g = [0.1, -0.1], mean 0 -> z = 0
    g, d = e_ref - e_theta, torch.tensor([True, False])
    z = kto_reference_point(g)
    assert z.item() == pytest.approx(0.0, abs=1e-7)
    per, info = kto_loss(g, d, beta=10.0, ref_point=z, lambda_d=1.0, lambda_u=2.0)
    # desirable: 1 - σ(10·0.1); undesirable (w = -1): 2·(1 - σ(-10·(-0.1)))
    assert per.mean().item() == pytest.approx(0.5 * ((1 - s(1.0)) + 2 * (1 - s(1.0))), rel=1e-5)
    # reference point clamped at 0: mean g negative -> z = 0
    assert kto_reference_point(torch.tensor([0.2, 0.2]) - torch.tensor([0.5, 0.5])).item() == 0.0
    # positive mean g -> z = mean g; loss-averse utility = -λ log σ
    g = torch.tensor([0.4, 0.4]) - torch.tensor([0.0, 0.2])  # [0.4, 0.2]
    z = kto_reference_point(g)
    assert z.item() == pytest.approx(0.3)
    per, _ = kto_loss(g, d, beta=1.0, ref_point=z, utility="loss-averse")
    want = 0.5 * (-math.log(s(0.4 - 0.3)) - math.log(s(-(0.2 - 0.3))))
    assert per.mean().item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="utility"):
        kto_loss(g, d, 1.0, z, utility="prospect")


def test_kto_reference_point_is_detached_and_global():
    """No gradient flows through z; with several processes z is the mean over all of them."""
    e_ref = torch.tensor([0.5, 0.5, 0.5])
    d = torch.tensor([True, False, True])
    e1 = torch.tensor([0.1, 0.2, 0.4], requires_grad=True)
    z = kto_reference_point(e_ref - e1)
    assert z.item() > 0 and not z.requires_grad
    kto_loss(e_ref - e1, d, 3.0, z)[0].mean().backward()
    e2 = e1.detach().clone().requires_grad_(True)
    w = d.float() * 2 - 1
    (1 - torch.sigmoid(w * 3.0 * ((e_ref - e2) - z.item()))).mean().backward()
    torch.testing.assert_close(e1.grad, e2.grad)
    # a second process's g (gathered): z is the mean over both, not this process's own
    other = torch.tensor([1.0, 1.0, 1.0])
    z2 = kto_reference_point(torch.tensor([0.0, 0.0, 0.0]), gather=lambda g: torch.cat([g, other]))
    assert z2.item() == pytest.approx(0.5)


def test_denoising_error_is_mean_over_elements():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]).view(2, 1, 2, 2)
    torch.testing.assert_close(denoising_error(pred, target), torch.tensor([1.0, 1.0]))
