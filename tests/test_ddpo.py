"""DDPO's loss against hand-worked values and its math."""

import numpy as np
import pytest
import torch

from diffalign.methods.ddpo import ddpo_loss
from diffalign.stats import PerPromptStatTracker


def test_ddpo_loss_hand_values():
    # ratios e^0 = 1, e^0.1 = 1.10517, e^-0.1 = 0.904837; clip 0.05 -> [0.95, 1.05]
    lp = torch.tensor([0.0, 0.1, -0.1])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 2.0, -1.0])
    loss, info = ddpo_loss(lp, old, adv, clip_range=0.05)
    # per sample max(-A r, -A clip(r)):
    #   1: max(-1, -1) = -1
    #   2: max(-2*1.10517, -2*1.05) = -2.1
    #   3: max(0.904837, 0.95) = 0.95
    assert loss.item() == pytest.approx((-1 - 2.1 + 0.95) / 3, abs=1e-5)
    assert info["clipfrac"].item() == pytest.approx(2 / 3)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.01) / 3, abs=1e-6)


def test_ratio_one_gradient_follows_advantage():
    lp = torch.zeros(2, requires_grad=True)
    loss, _ = ddpo_loss(lp, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=1e-4)
    loss.backward()
    # at ratio 1 the loss is -mean(A) and descending raises log-prob of positive advantages
    assert loss.item() == pytest.approx(0.0)
    assert lp.grad[0] < 0 < lp.grad[1]


def test_clipped_ratio_has_no_gradient():
    lp = torch.tensor([0.5], requires_grad=True)  # ratio 1.65 > 1 + eps with positive advantage
    loss, _ = ddpo_loss(lp, torch.zeros(1), torch.tensor([1.0]), clip_range=0.1)
    loss.backward()
    assert lp.grad.item() == 0.0


def test_stat_tracker_uses_batch_stats_until_min_count_then_prompt_buffer():
    tr = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tr.update(["a", "b"], np.array([1.0, 3.0]))  # one each: batch mean 2, std 1
    np.testing.assert_allclose(adv, [-1.0, 1.0], atol=1e-5)
    adv = tr.update(["a", "a"], np.array([3.0, 5.0]))  # buffer a = [1, 3, 5]: mean 3, std sqrt(8/3)
    np.testing.assert_allclose(adv, [0.0, 2 / np.sqrt(8 / 3)], atol=1e-5)
    state = tr.state_dict()
    tr2 = PerPromptStatTracker()
    tr2.load_state_dict(state)
    assert tr2.update(["a"], np.array([1.0])).tolist() == tr.update(["a"], np.array([1.0])).tolist()
