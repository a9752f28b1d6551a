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


def tiny_folder(tmp_path_factory, name: str, *extra: str) -> str:
    """`diffalign models make-tiny-NAME OUT [extra]` into a fresh temporary folder."""
    from diffalign.cli import main

    out = tmp_path_factory.mktemp("tiny") / name
    assert main(["models", f"make-tiny-{name.split('-')[0]}", str(out), *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny random Stable Diffusion 1.x pipeline folder (32x32 images, 8x8x4 latents)."""
    return tiny_folder(tmp_path_factory, "sd")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny random Stable Diffusion 3 pipeline folder, with T5."""
    return tiny_folder(tmp_path_factory, "sd3")


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    """The tiny SD3 folder without T5 (model_index.json lists text_encoder_3 as null)."""
    return tiny_folder(tmp_path_factory, "sd3-no-t5", "--no-t5")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny random FLUX.1-dev-like pipeline folder (guidance embedding, dynamic shifting); load it at 32 px."""
    return tiny_folder(tmp_path_factory, "flux")


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory):
    """The tiny FLUX folder without the guidance embedding (FLUX.1-schnell's layout)."""
    return tiny_folder(tmp_path_factory, "flux-schnell", "--no-guidance")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state; every test starts (and ends) without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
