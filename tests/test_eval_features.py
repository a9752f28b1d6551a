"""eval.features / eval.real: diversity and Fréchet distance in a CLIP space, the pixel fallback."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.eval import spaces
from diffalign.eval.core import sample_metrics
from diffalign.models.base import EvalSpace
from diffalign.models.tiny import make_tiny_clip
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(make_tiny_clip(tmp_path_factory.mktemp("models") / "clip"))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A flat folder of 12 RGB 8x8 PNGs."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def _eval(features=None, real=None):
    return SimpleNamespace(features=features, real=real)


def _samples(n=6):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(n)), ["0", "0", "0", "1", "1", "1"][:n]


def test_clip_space_features_diversity_and_frechet(clip, real):
    model = tiny_model()
    spaces.configure(model, _eval(clip, real))
    space = spaces.get_space(model)
    assert space.name == f"clip:{clip}" and "CLIP" in space.description
    images, prompts = _samples()
    f = space.features(images)
    assert f.shape == (6, 32) and torch.allclose(f.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert spaces.real_features(model).shape == (12, 32)
    m = sample_metrics(model, images, prompts)
    assert m["diversity"] > 0 and m["frechet"] > 0 and m["frechet_real"] >= 0


def test_no_real_data_skips_the_frechet_distance(clip):
    model = tiny_model()
    spaces.configure(model, _eval(clip))
    m = sample_metrics(model, *_samples())
    assert m["diversity"] > 0 and "frechet" not in m and "frechet_real" not in m


def test_clip_space_keeps_the_models_own_real_data_and_classes(clip):
    model = tiny_model()
    model.name = "tiny-own-space"
    own = EvalSpace("own", lambda x: x.flatten(1), lambda: torch.rand(10, 1, 8, 8),
                    lambda x: (x.mean((1, 2, 3)) > 0.5).long(), 2)
    model.eval_space = lambda: own
    spaces.configure(model, _eval(clip))
    m = sample_metrics(model, *_samples())
    assert "frechet" in m and len(m["class_histogram"]) == 2 and spaces.real_features(model).shape == (10, 32)
    spaces.configure(model, _eval())  # back to the model's own space, cached under its own key
    assert spaces.get_space(model) is own and spaces.real_features(model).shape == (10, 64)


def test_pixel_fallback_for_image_models_without_a_space(real):
    model = tiny_model()
    spaces.configure(model, _eval(real=real))
    space = spaces.get_space(model)
    assert space.name == "pixels-32x32" and "32x32" in space.description
    images, _ = _samples()
    assert space.features(images).shape == (6, 3 * 32 * 32)
    assert spaces.real_features(model).shape == (12, 3 * 32 * 32)
    with pytest.raises(ValueError, match="pixel evaluation space needs images"):
        space.features(torch.rand(4, 2))


def test_run_configures_the_space_and_checks_the_folder(clip, tmp_path):
    from diffalign.context import Run
    from diffalign.eval import evaluate
    from diffalign.methods import resolve_config

    base = {"method": "ddpo", "model": "tiny-test", "reward": "ink", "sampling": {"num_steps": 2},
            "eval": {"reward": None, "per_prompt": 2, "features": clip}, "train": {"batch_size": 4}}
    run = Run(resolve_config(base=base)[0])
    assert run.model.eval_space.key == (clip, None)
    res = evaluate(run, run.sampler)
    assert res["diversity"] > 0 and "frechet" not in res
    base["eval"]["features"] = str(tmp_path / "no-clip")
    with pytest.raises(FileNotFoundError, match="eval.features: CLIP folder .*no-clip.* does not exist"):
        Run(resolve_config(base=base)[0])
