"""DDPO's per-prompt advantages (its loss is in test_losses.py)."""

import numpy as np
from diffalign.stats import PerPromptStatTracker


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
