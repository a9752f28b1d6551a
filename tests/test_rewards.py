"""Rewards: registry, validation, combination, digits classifiers, ink, compressibility, quadratic."""

import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:  # for the 'custom_reward:...' specs
    sys.path.insert(0, TESTS)

from diffalign.data import digits as data_digits  # noqa: E402
from diffalign.rewards import Reward, RewardError, build_reward, list_rewards  # noqa: E402
from diffalign.rewards import digits as rdigits  # noqa: E402
from diffalign.rewards import toy2d  # noqa: E402

BUILTINS = {
    "classifier": True,
    "classifier_heldout": True,
    "ink": True,
    "compressibility": False,
    "incompressibility": False,
    "quadratic": True,
}


@pytest.fixture(scope="module")
def test_split():
    x, y = data_digits.load("test")
    return x, y, [f"a handwritten {int(d)}" for d in y]


# ---------------------------------------------------------------- registry


def test_registry_lists_builtins_with_flags():
    listed = list_rewards()
    assert [n for n, _, _ in listed] == sorted(n for n, _, _ in listed)
    table = {n: (desc, diff) for n, desc, diff in listed}
    for name, differentiable in BUILTINS.items():
        assert name in table, f"{name} not registered"
        desc, diff = table[name]
        assert diff is differentiable, name
        assert isinstance(desc, str) and len(desc) > 20, name
        r = build_reward(name)
        assert r.name == name and r.differentiable is differentiable and r.description == desc


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(ValueError) as e:
        build_reward("clasifier")
    msg = str(e.value)
    for name in BUILTINS:
        assert name in msg
    assert "Did you mean 'classifier'" in msg
    with pytest.raises(ValueError, match="cannot import module"):
        build_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="cannot parse reward spec"):
        build_reward("1.0*classifier+*ink")


# ---------------------------------------------------------------- digits classifiers


@pytest.mark.parametrize("name", ["classifier", "classifier_heldout"])
def test_classifier_accuracy_and_label_sensitivity(name, test_split):
    x, y, prompts = test_split
    reward = build_reward(name)
    r_true, info = reward(x, prompts)
    assert info["accuracy"] >= 0.97, (name, info)
    assert (r_true <= 0).all()
    wrong = [str((int(d) + 1) % 10) for d in y]
    r_wrong, info_wrong = reward(x, wrong)
    assert info_wrong["accuracy"] < 0.1
    assert r_true.mean() > r_wrong.mean() + 2.0
    # the cached metrics agree with what we measure here
    heldout = name == "classifier_heldout"
    assert rdigits.classifier_metrics(heldout)["test_accuracy"] == pytest.approx(info["accuracy"], abs=1e-6)


def test_classifiers_are_independent_frozen_networks(test_split):
    x, y, _ = test_split
    a = rdigits.load_classifier(heldout=False)
    b = rdigits.load_classifier(heldout=True)
    assert type(a) is not type(b)
    assert set(a.state_dict()) != set(b.state_dict()) or any(
        not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()
    )
    for net in (a, b):
        assert not net.training
        assert all(not p.requires_grad for p in net.parameters())
        assert (net(x).argmax(1) == y).float().mean() >= 0.97
    with torch.no_grad():
        pa, pb = a(x).softmax(1), b(x).softmax(1)
    assert (pa - pb).abs().max() > 1e-2  # different functions, not copies
    feats = rdigits.features(x[:5])
    assert feats.shape == (5, 128) and torch.isfinite(feats).all()


def test_digits_rewards_pool_other_resolutions(test_split):
    x, _, prompts = test_split
    x, prompts = x[:16], prompts[:16]
    big = F.interpolate(x, scale_factor=2, mode="nearest")  # pooling back to 8x8 is exact
    for name in ("classifier", "classifier_heldout", "ink"):
        reward = build_reward(name)
        torch.testing.assert_close(reward(big, prompts)[0], reward(x, prompts)[0])
    with pytest.raises(ValueError, match="exactly one digit"):
        build_reward("classifier")(x[:2], ["three", "3"])


@pytest.mark.parametrize("spec", ["classifier", "classifier_heldout", "ink", "1.0*classifier+0.1*ink"])
def test_gradients_flow_to_images(spec, test_split):
    x, _, prompts = test_split
    images = x[:8].clone().mul(0.9).add(0.05).requires_grad_(True)  # inside (0, 1): ink's clamp passes
    reward = build_reward(spec)
    assert reward.differentiable
    r, _ = reward(images, prompts[:8])
    assert r.requires_grad
    r.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_ink_prefers_thicker_and_brighter(test_split):
    x, _, prompts = test_split
    x, prompts = x[:32], prompts[:32]
    ink = build_reward("ink")
    thick = F.max_pool2d(x, 3, stride=1, padding=1)  # dilated strokes
    r, r_thick, r_dim = ink(x, prompts)[0], ink(thick, prompts)[0], ink(0.5 * x, prompts)[0]
    assert (r_thick > r).all() and (r > r_dim).all()
    torch.testing.assert_close(r, x.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(ink(torch.zeros(2, 1, 8, 8), ["1", "2"])[0], torch.zeros(2))
    torch.testing.assert_close(ink(torch.ones(2, 1, 8, 8), ["1", "2"])[0], torch.ones(2))


def test_compressibility_prefers_blank_and_is_not_differentiable(test_split):
    x, _, prompts = test_split
    comp = build_reward("compressibility")
    assert not comp.differentiable
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(4, 1, 8, 8, generator=g)
    blank = torch.zeros(4, 1, 8, 8)
    r_blank, _ = comp(blank, prompts[:4])
    r_noise, _ = comp(noise, prompts[:4])
    r_real, info = comp(x[:4], prompts[:4])
    assert (r_blank < 0).all()
    assert (r_blank > r_real).all() and (r_real.mean() > r_noise.mean())
    assert r_blank[0].item() == pytest.approx(-rdigits.png_bytes(blank[0, 0].to(torch.uint8).numpy()) / 1000)
    assert info["png_bytes_mean"] > 0


def test_incompressibility_is_minus_compressibility_at_any_resolution():
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.zeros(1, 3, 64, 48), torch.rand(1, 3, 64, 48, generator=g)])  # RGB, not square
    comp, inc = build_reward("compressibility"), build_reward("incompressibility")
    r, _ = comp(images, ["", ""])
    assert r[0] > r[1] and not inc.differentiable
    assert torch.equal(inc(images, ["", ""])[0], -r)
    assert r[1] < -5  # 64x48x3 uniform noise: about 9 kB of PNG


# ---------------------------------------------------------------- validation


def _bad(rewards_fn):
    return Reward("bad", lambda images, prompts, metadata: (rewards_fn(len(images)), {}), differentiable=False)


def test_nan_and_inf_rewards_raise_naming_the_reward():
    images, prompts = torch.rand(4, 1, 8, 8), ["1"] * 4

    def nan_at_0_3(n):
        r = torch.zeros(n)
        r[0], r[3] = float("nan"), float("inf")
        return r

    with pytest.raises(RewardError, match=r"reward 'bad' returned NaN/inf for 2 of 4 samples \(indices \[0, 3\]\)"):
        _bad(nan_at_0_3)(images, prompts)
    with pytest.raises(RewardError, match=r"reward 'custom_reward:make_nan' returned NaN/inf for 2 of 4"):
        build_reward("custom_reward:make_nan")(images, prompts)
    assert issubclass(RewardError, ValueError)


def test_wrong_shapes_and_counts_raise():
    images, prompts = torch.rand(4, 1, 8, 8), ["1"] * 4
    with pytest.raises(RewardError, match=r"reward 'bad' returned shape \(3, 2\) for 4 images; expected \(4,\)"):
        _bad(lambda n: torch.zeros(3, 2))(images, prompts)
    with pytest.raises(RewardError, match=r"reward 'custom_reward:make_wrong_shape' returned shape \(4, 2\)"):
        build_reward("custom_reward:make_wrong_shape")(images, prompts)
    with pytest.raises(RewardError, match=r"shape \(4, 1\)"):
        _bad(lambda n: torch.zeros(n, 1))(images, prompts)
    with pytest.raises(RewardError, match=r"4 images but 3 prompts"):
        build_reward("ink")(images, prompts[:3])
    with pytest.raises(RewardError, match="must return"):
        Reward("noinfo", lambda i, p, m: "oops", False)(images, prompts)
    # array-like and integer outputs are accepted and become float tensors
    r, info = _bad(lambda n: [1, 2, 3, 4])(images, prompts)
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 2.0, 3.0, 4.0] and info == {}


# ---------------------------------------------------------------- combination & user rewards


def test_weighted_sum_matches_hand_computation(test_split):
    x, _, prompts = test_split
    x, prompts = x[:16], prompts[:16]
    clf, ink, comp = build_reward("classifier"), build_reward("ink"), build_reward("compressibility")
    expected = 1.0 * clf(x, prompts)[0] + 0.1 * ink(x, prompts)[0]

    combo = build_reward("1.0*classifier+0.1*ink")
    assert combo.differentiable and combo.name == "1.0*classifier+0.1*ink"
    r, info = combo(x, prompts)
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(info["classifier"], clf(x, prompts)[0])
    torch.testing.assert_close(info["ink"], ink(x, prompts)[0])
    assert info["classifier/accuracy"] == clf(x, prompts)[1]["accuracy"]

    same = build_reward({"classifier": 1.0, "ink": 0.1})
    torch.testing.assert_close(same(x, prompts)[0], expected)

    mixed = build_reward({"ink": 2.0, "compressibility": -0.5, "custom_reward:make_brightness": 0.25})
    assert not mixed.differentiable  # compressibility is not
    hand = 2.0 * ink(x, prompts)[0] - 0.5 * comp(x, prompts)[0] + 0.25 * x.flatten(1).sum(1)
    torch.testing.assert_close(mixed(x, prompts)[0], hand)
    torch.testing.assert_close(build_reward("2*ink-0.5*compressibility")(x, prompts)[0],
                               2.0 * ink(x, prompts)[0] - 0.5 * comp(x, prompts)[0])


def test_module_function_specs():
    images, prompts = torch.rand(3, 1, 8, 8), ["1", "2", "3"]
    fac = build_reward("custom_reward:make_brightness")
    assert fac.differentiable and fac.description == "scaled pixel sum"
    r, info = fac(images, prompts)
    torch.testing.assert_close(r, images.flatten(1).sum(1))
    assert info["device"] == "cpu"
    scaled = build_reward("custom_reward:make_brightness", scale=3.0)
    torch.testing.assert_close(scaled(images, prompts)[0], 3.0 * images.flatten(1).sum(1))

    direct = build_reward("custom_reward:pixel_max")  # first parameter 'images': used as is
    assert not direct.differentiable
    torch.testing.assert_close(direct(images, prompts)[0], images.flatten(1).max(1).values)
    with pytest.raises(ValueError, match="no attribute"):
        build_reward("custom_reward:does_not_exist")


# ---------------------------------------------------------------- toy2d


def test_quadratic_max_value_and_gradient():
    q = build_reward("quadratic")
    target = torch.tensor(toy2d.TARGET)
    assert toy2d.SCALE > 0
    r_t, _ = q(target[None], None)
    assert r_t.item() == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    pts = target + torch.randn(64, 2, generator=g)
    r, _ = q(pts, [""] * 64)
    assert (r < 0).all()
    # known value: at the origin, -SCALE * ||TARGET||^2
    r0, _ = q(torch.zeros(1, 2), [""])
    assert r0.item() == pytest.approx(-toy2d.SCALE * float((target**2).sum()))
    assert build_reward("quadratic", target=(1.0, -1.0), scale=2.0)(torch.zeros(1, 2), [""])[0].item() == pytest.approx(-4.0)
    # the gradient points toward the target
    x = pts.clone().requires_grad_(True)
    q(x, [""] * 64)[0].sum().backward()
    direction = target - pts
    cos = F.cosine_similarity(x.grad, direction, dim=1)
    assert (cos > 0.999).all()
    torch.testing.assert_close(x.grad, 2 * toy2d.SCALE * direction)


def test_a_reward_network_trains_on_first_use_even_inside_no_grad():
    """The first use of a reward network may come from evaluation code under torch.no_grad()
    (e.g. the held-out classifier's features): training it must still work there."""
    cfg = dict(rdigits._CONFIGS[True], epochs=1)  # the held-out MLP, one epoch
    with torch.no_grad():
        net, stats = rdigits._train(cfg)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert stats["test_accuracy"] > 0.5
    from diffalign.models.pretraining import denoising_pretrain

    from diffusers import DDIMScheduler

    from diffalign.models.toy2d import ToyMLP

    net = ToyMLP(hidden=8, n_blocks=1, time_dim=8)

    with torch.no_grad():
        denoising_pretrain(net, DDIMScheduler(num_train_timesteps=100), {"lr": 1e-2, "steps": 3, "warmup": 1,
                           "ema_decay": 0.9, "num_train_timesteps": 100},
                           lambda g: (torch.randn(4, 2, generator=g), None), lambda n, x, t, c: n(x, t),
                           torch.Generator().manual_seed(0), Path(tempfile.mkdtemp()) / "net", "t", progress=False)
        assert not torch.is_grad_enabled()
