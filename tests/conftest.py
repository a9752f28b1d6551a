"""Fixtures shared by the tests: the tiny random models (`tiny_models.py`) and the tiny random
pipeline folders (`diffalign models make-tiny-sd|make-tiny-sd3|make-tiny-flux`), one per test module."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DIFFALIGN_CACHE", str(ROOT / ".cache" / "diffalign"))
# one thread per pytest-xdist worker (make test runs two), else both cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def tiny():
    from tiny_models import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny random Stable Diffusion 1.x pipeline folder (32x32 images, 8x8x4 latents)."""
    from diffalign.cli import main

    out = tmp_path_factory.mktemp("tiny") / "sd"
    assert main(["models", "make-tiny-sd", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny random Stable Diffusion 3 pipeline folder, with T5."""
    from diffalign.cli import main

    out = tmp_path_factory.mktemp("tiny") / "sd3"
    assert main(["models", "make-tiny-sd3", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    """The tiny SD3 folder without T5 (model_index.json lists text_encoder_3 as null)."""
    from diffalign.models.tiny import make_tiny_sd3

    return str(make_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3-no-t5", t5=False))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny random FLUX.1-dev-like pipeline folder (guidance embedding, dynamic shifting); load it at 32 px."""
    from diffalign.cli import main

    out = tmp_path_factory.mktemp("tiny") / "flux"
    assert main(["models", "make-tiny-flux", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory):
    """The tiny FLUX folder without the guidance embedding (FLUX.1-schnell's layout)."""
    from diffalign.models.tiny import make_tiny_flux

    return str(make_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux-schnell", guidance=False))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state; every test starts (and ends) without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
