"""The `digits-rotated` model (digits pretrained under random rotations) and the angle judge (`upright`) for
DDO's orientation experiment. Fast: no full pretraining; the judge trains in about 5 s on first use."""

from pathlib import Path

import torch

from diffalign.cache import config_key
from diffalign.data import digits as digits_data
from diffalign.models import digits
from diffalign.rewards import build_reward, list_rewards
from diffalign.rewards import orientation

ROOT = Path(__file__).resolve().parents[1]


def turned_test_digits(degrees: float, n: int = 120):
    """The first n test digits, half turned by +degrees and half by -degrees, and the angles."""
    x, _ = digits_data.load("test")
    angles = torch.tensor([degrees, -degrees]).repeat(n // 2)
    return digits_data.rotate(x[:n], angles), angles, x[:n]


def test_rotate_by_90_is_rot90_and_by_0_is_identity():
    x = torch.rand(4, 1, 8, 8)
    for k in (1, -1, 2):
        torch.testing.assert_close(digits_data.rotate(x, torch.full((4,), 90.0 * k)), torch.rot90(x, k, (2, 3)))
    torch.testing.assert_close(digits_data.rotate(x, torch.zeros(4)), x)
    shifted = digits_data.rotate(x, torch.zeros(4), torch.tensor([[1.0, 0.0]] * 4))  # one pixel to the right
    torch.testing.assert_close(shifted[..., 1:], x[..., :-1])
    assert (shifted[..., 0] == 0).all()


def test_training_batches_turn_each_image_by_an_angle_within_the_spread(monkeypatch):
    """Same images and labels as `digits` for the same generator, each turned (in [0, 1] space) by its own
    angle in ±45°; `digits` itself draws no angle, so its batches are unchanged."""
    calls = []
    rotate = digits_data.rotate
    monkeypatch.setattr(digits_data, "rotate", lambda x, a, *s: calls.append(a) or rotate(x, a, *s))
    plain, y = digits.training_batches(dict(digits.DEFAULT_CONFIG, batch_size=256))(torch.Generator().manual_seed(0))
    assert not calls
    turned, y_r = digits.training_batches(dict(digits.ROTATED_CONFIG, batch_size=256))(torch.Generator().manual_seed(0))
    (angles,) = calls
    assert torch.equal(y, y_r) and angles.abs().max() <= 45 and angles.abs().max() > 40 and angles.std() > 20
    torch.testing.assert_close(turned, rotate((plain + 1) / 2, angles) * 2 - 1)
    assert turned.min() >= -1 and not torch.allclose(turned, plain)


def test_model_is_registered_with_its_own_config_and_rewards(tmp_path):
    from diffalign.models import MODELS, model_names

    assert "digits-rotated" in model_names()
    entry = MODELS["digits-rotated"]
    assert (entry.reward, entry.eval_reward) == ("upright", "classifier_heldout") and "DDO" in entry.description
    changed = {k: v for k, v in digits.ROTATED_CONFIG.items() if digits.DEFAULT_CONFIG.get(k) != v}
    assert changed == {"rotate_degrees": 45}
    assert config_key(digits.ROTATED_CONFIG) == "1e3a08c80e89" != config_key(digits.DEFAULT_CONFIG)  # pinned
    cfg = dict(digits.ROTATED_CONFIG, steps=2, batch_size=8, warmup=1)  # the pretraining runs (two steps)
    digits.DIGITS.pretrain(tmp_path / "m", cfg, progress=False)
    assert digits.load_from_folder(tmp_path / "m").sample_shape == (1, 8, 8)


def test_angle_judge_reads_known_angles_of_test_digits():
    """Trained on the train split; on test digits turned by known angles its error is a few degrees
    (measured: 3.1° mean over ±60°, 3.0° mean |angle| read on the digits as written)."""
    metrics = orientation.judge_metrics()
    assert metrics["test_mae_degrees"] < 5 and metrics["test_upright_abs_degrees"] < 5
    for degrees in (15.0, 30.0, 45.0):
        x, angles, _ = turned_test_digits(degrees)
        predicted = orientation.predict_angle(x)
        assert (predicted - angles).abs().mean() < 7, degrees
        assert (predicted.sign() == angles.sign()).float().mean() > 0.9, degrees


def test_upright_prefers_upright_digits_and_has_gradients():
    assert {"upright": True, "upright_heldout": True}.items() <= {n: d for n, _, d in list_rewards()}.items()
    reward = build_reward("upright")
    x, _, upright = turned_test_digits(40.0)
    r_turned, info = reward(x, [""] * len(x))
    r_upright, _ = reward(upright, [""] * len(x))
    assert r_upright.mean() > r_turned.mean() + 0.5 and (r_upright > r_turned).float().mean() > 0.9
    assert 30 < info["abs_angle"] < 50
    images = x.clone().requires_grad_(True)
    reward(images, [""] * len(x))[0].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_heldout_judge_trains_inside_no_grad():
    """The held-out judge (a CNN) with two epochs: already reads angles to within 20°."""
    with torch.no_grad():
        _, metrics = orientation.train_judge(dict(orientation._CONFIGS[True], epochs=2))
        assert not torch.is_grad_enabled()
    assert metrics["test_mae_degrees"] < 20


def test_bench_suite_names_the_rotated_configs():
    from diffalign.bench.suite import SUITES, config_path
    from diffalign.train import resolve_config

    suite = SUITES["digits-rotated"]
    assert suite.model == "digits-rotated" and suite.methods == ["ddo-dpo", "diffusion-dpo", "ddpo"]
    for method in suite.methods:
        path = config_path(ROOT / "configs", method, "digits-rotated")
        assert path.name == f"{method.replace('-', '_')}_digits_rotated.yaml"
        cfg, _ = resolve_config(path)
        assert (cfg.model, cfg.reward, cfg.eval.reward) == ("digits-rotated", "upright", "classifier_heldout")


def test_upright_is_finite_at_any_resolution_and_never_positive():
    reward = build_reward("upright")
    for x in (torch.cat([torch.zeros(2, 1, 8, 8), torch.rand(2, 1, 8, 8)]), torch.rand(3, 1, 16, 16)):
        r, _ = reward(x, [""] * len(x))
        assert torch.isfinite(r).all() and (r <= 0).all()
