"""The embedded base models `digits` and `toy2d`: quality, interface, loading errors.

Uses the cache ($DIFFALIGN_CACHE, set by conftest / the Makefile): on a cold cache
the first test that loads a model pretrains it (digits ~2 min, toy2d ~40 s on CPU).
"""

import json
import shutil

import pytest
import torch

from diffalign.cache import config_key
from diffalign.data import digits as digits_data
from diffalign.models import digits, toy2d


@pytest.fixture(scope="module")
def digits_model():
    return digits.load(progress=False)


@pytest.fixture(scope="module")
def toy_model():
    return toy2d.load(progress=False)


def ddim_sample(model, n, cond=None, guidance=1.0, steps=20, eta=1.0, generator=None):
    """Plain DDIM sampling loop with classifier-free guidance (independent of the library's sampler)."""
    sched = model.scheduler
    sched.set_timesteps(steps)
    x = torch.randn((n, *model.sample_shape), generator=generator)
    use_cfg = cond is not None and guidance != 1.0
    with torch.no_grad():
        for t in sched.timesteps:
            if use_cfg:
                eps_c, eps_u = model.predict_noise(torch.cat([x, x]), t, torch.cat([cond, model.null_condition(n)])).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = model.predict_noise(x, t, cond)
            x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x


def final_step_std(sched, steps):
    """Std of the last DDIM step at eta=1 (it must be > 0 for the step's log-prob to exist)."""
    sched.set_timesteps(steps)
    t = int(sched.timesteps[-1])
    prev = t - sched.config.num_train_timesteps // steps
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
    return float(((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt())


@pytest.mark.parametrize("module", [digits, toy2d])
def test_scheduler_final_step_has_noise(module):
    sched = module.make_scheduler()
    for steps in (10, 20, 50):
        assert final_step_std(sched, steps) > 1e-3
    assert sched.config.set_alpha_to_one is False and sched.config.prediction_type == "epsilon"


# ---------------------------------------------------------------- digits


def test_digits_quality(digits_model):
    from sklearn.svm import SVC

    m = digits_model
    x_tr, y_tr = digits_data.load("train")
    x_te, y_te = digits_data.load("test")
    clf = SVC(gamma=0.256, C=10.0).fit(x_tr.flatten(1).numpy(), y_tr.numpy())
    clf_acc = (clf.predict(x_te.flatten(1).numpy()) == y_te.numpy()).mean()
    assert clf_acc > 0.97, clf_acc  # the check classifier itself must be good

    labels = torch.arange(10).repeat(20)
    cond = m.encode_prompts([str(int(d)) for d in labels])
    x0 = ddim_sample(m, len(labels), cond, guidance=m.guidance_scale, steps=m.num_inference_steps,
                     generator=torch.Generator().manual_seed(0))
    images = m.decode(x0)
    assert images.shape == (len(labels), 1, 8, 8)
    assert images.min() >= 0 and images.max() <= 1
    pred = clf.predict(images.flatten(1).numpy())
    acc = float((pred == labels.numpy()).mean())
    print(f"\ndigits: {acc:.1%} of samples classified as the prompted digit "
          f"(guidance {m.guidance_scale}, {m.num_inference_steps} DDIM steps, eta=1; check classifier {clf_acc:.1%})")
    assert acc >= 0.8


def test_digits_interface(digits_model):
    m = digits_model
    assert m.name == "digits" and m.sample_shape == (1, 8, 8)
    assert m.prompts == [str(d) for d in range(10)]
    assert m.path and (digits.load_from_folder(m.path).path == m.path)
    assert not m.denoiser.training
    assert not any(p.requires_grad for p in m.denoiser.parameters())
    sched = m.scheduler
    assert sched.config.set_alpha_to_one is False and sched.config.prediction_type == "epsilon"
    assert final_step_std(sched, m.num_inference_steps) > 1e-3

    c = m.encode_prompts(["3", "a handwritten 3", "digit 7"])
    assert c.dtype == torch.long and c.tolist() == [3, 3, 7] and c.device == m.device
    with pytest.raises(ValueError, match="exactly one digit"):
        m.encode_prompts(["abc"])
    null = m.null_condition(4)
    assert null.dtype == torch.long and null.tolist() == [10] * 4

    # decode is differentiable and maps [-1, 1] -> [0, 1]
    x = torch.zeros(2, 1, 8, 8, requires_grad=True)
    img = m.decode(x)
    assert torch.allclose(img, torch.full_like(img, 0.5))
    img.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    eps = m.predict_noise(torch.randn(3, 1, 8, 8), 500, c)
    assert eps.shape == (3, 1, 8, 8)


def test_digits_lora_targets_inject(digits_model):
    from peft import LoraConfig, inject_adapter_in_model

    m = digits.load_from_folder(digits_model.path)  # a fresh copy: injection mutates the module
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([1, 2, 3, 10])
    before = m.predict_noise(x, t, c)
    m.denoiser = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=m.lora_targets), m.denoiser)
    names = [n for n, _ in m.denoiser.named_modules() if n.endswith("lora_A")]
    assert len(names) >= 10
    assert any("to_q" in n for n in names) and any("conv1" in n for n in names)
    assert torch.allclose(m.predict_noise(x, t, c), before)  # LoRA B starts at zero


def test_digits_pretrain_deterministic(tmp_path):
    cfg = dict(digits.DEFAULT_CONFIG, steps=2, batch_size=8, warmup=1)
    digits.pretrain(tmp_path / "a", cfg, progress=False)
    digits.pretrain(tmp_path / "b", cfg, progress=False)
    a, b = digits.load_from_folder(tmp_path / "a"), digits.load_from_folder(tmp_path / "b")
    for (na, pa), (nb, pb) in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


# ---------------------------------------------------------------- toy2d


def test_toy2d_distribution(toy_model):
    m = toy_model
    g = torch.Generator().manual_seed(0)
    n = 2000

    def dist(a, b):
        return toy2d.sliced_wasserstein(a, b, n_proj=256, generator=torch.Generator().manual_seed(1))

    floor = sum(dist(toy2d.sample_data(n, g), toy2d.sample_data(n, g)) for _ in range(3)) / 3
    samples = ddim_sample(m, n, None, steps=m.num_inference_steps, eta=1.0, generator=g)
    assert samples.shape == (n, 2) and torch.isfinite(samples).all()
    model_d = sum(dist(samples, toy2d.sample_data(n, g)) for _ in range(3)) / 3
    data = toy2d.sample_data(n, g)
    mean, cov = data.mean(0), torch.cov(data.T)
    gauss = mean + torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(cov).T  # moment-matched Gaussian
    normal_d = dist(torch.randn(n, 2, generator=g), toy2d.sample_data(n, g))
    gauss_d = dist(gauss, toy2d.sample_data(n, g))
    print(f"\ntoy2d sliced W2: model-vs-data {model_d:.4f}, data-vs-data floor {floor:.4f}, "
          f"moment-matched Gaussian {gauss_d:.4f}, standard normal {normal_d:.4f}")
    assert model_d <= 2.5 * floor
    assert model_d <= normal_d / 2.5
    assert model_d < gauss_d
    # samples concentrate where the true density is: mean log-density close to the data's
    lp_model, lp_data = toy2d.log_prob(samples).mean(), toy2d.log_prob(data).mean()
    assert abs(lp_model - lp_data) < 0.35, (lp_model, lp_data)


def test_toy2d_interface(toy_model):
    m = toy_model
    assert m.name == "toy2d" and m.sample_shape == (2,) and m.prompts == [""]
    assert m.encode_prompts([""]) is None and m.null_condition(3) is None
    assert m.guidance_scale == 1.0
    assert m.scheduler.config.set_alpha_to_one is False
    assert final_step_std(m.scheduler, m.num_inference_steps) > 1e-3
    assert not any(p.requires_grad for p in m.denoiser.parameters())
    x = torch.randn(5, 2, requires_grad=True)
    assert m.decode(x) is x
    assert m.predict_noise(x, 300, None).shape == (5, 2)
    assert m.predict_noise(x, torch.arange(5) * 100, None).shape == (5, 2)

    # mixture constants are a proper density: integrates to ~1 on a grid
    assert torch.isclose(toy2d.WEIGHTS.sum(), torch.tensor(1.0))
    s = torch.linspace(-4, 4, 401)
    grid = torch.stack(torch.meshgrid(s, s, indexing="ij"), -1).reshape(-1, 2)
    mass = toy2d.log_prob(grid).exp().sum() * (s[1] - s[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3

    from peft import LoraConfig, inject_adapter_in_model

    fresh = toy2d.load_from_folder(m.path)
    before = fresh.predict_noise(x, 300, None)
    fresh.denoiser = inject_adapter_in_model(LoraConfig(r=2, target_modules=fresh.lora_targets), fresh.denoiser)
    n_lora = sum(1 for n, _ in fresh.denoiser.named_modules() if n.endswith("lora_A"))
    assert n_lora == len(m.lora_targets) >= 5
    assert torch.allclose(fresh.predict_noise(x, 300, None), before)


def test_toy2d_pretrain_deterministic(tmp_path):
    cfg = dict(toy2d.DEFAULT_CONFIG, steps=5, batch_size=16, warmup=1)
    toy2d.pretrain(tmp_path / "a", cfg, progress=False)
    toy2d.pretrain(tmp_path / "b", cfg, progress=False)
    a, b = toy2d.load_from_folder(tmp_path / "a"), toy2d.load_from_folder(tmp_path / "b")
    for pa, pb in zip(a.denoiser.parameters(), b.denoiser.parameters()):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------- loading errors


@pytest.mark.parametrize("module", [digits, toy2d])
def test_load_from_folder_missing(module, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        module.load_from_folder(missing)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="scheduler|unet|mlp"):
        module.load_from_folder(missing)


@pytest.mark.parametrize("module,sub", [(digits, "unet"), (toy2d, "mlp")])
def test_corrupt_cache_entry(module, sub, tmp_path, monkeypatch):
    """A cache entry marked DONE but with missing or garbage weights gives a clear error, no silent retrain."""
    good = module.load(progress=False).path
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path))
    entry = tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}-{config_key(module.DEFAULT_CONFIG)}"
    shutil.copytree(good, entry)
    assert json.loads((entry / "config.json").read_text()) == json.loads(json.dumps(module.DEFAULT_CONFIG))

    weights = entry / sub / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="delete the folder") as err:
        module.load(progress=False)
    assert str(entry) in str(err.value)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="delete the folder") as err:
        module.load(progress=False)
    assert str(entry) in str(err.value)


def test_cache_keys_are_pinned():
    """The cache folders are named by a hash of each embedded model's config: a change to what goes into it
    re-pretrains every user's models, so it must be a deliberate one (update these with a reason)."""
    keys = {"digits": (digits.DEFAULT_CONFIG, "ae3e7b0481ec"), "digits-flow": (digits.FLOW_CONFIG, "1e35ee65f6f0"),
            "toy2d": (toy2d.DEFAULT_CONFIG, "40b6dcde46bd"), "toy2d-flow": (toy2d.FLOW_CONFIG, "e0b37a9849ae")}
    assert {name: config_key(config) for name, (config, _) in keys.items()} == {n: k for n, (_, k) in keys.items()}
    from diffalign.models import MODELS, model_names

    model_names()
    assert {n: (MODELS[n].reward, MODELS[n].eval_reward) for n in keys} == {
        "digits": ("classifier", "classifier_heldout"), "digits-flow": ("classifier", "classifier_heldout"),
        "toy2d": ("quadratic", None), "toy2d-flow": ("quadratic", None)}
