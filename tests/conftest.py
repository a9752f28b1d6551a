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


# The slowest tests (seconds on 2 CPU cores, from `pytest --durations`), started first: with the two workers
# taking the longest remaining test as they free up, the suite does not end waiting on one long test.
SLOW_FIRST = {
    "tests/test_preference.py::test_method_raises_classifier_reward_on_digits[d3po]": 170,
    "tests/test_preference.py::test_method_raises_classifier_reward_on_digits[tailorpo]": 90,
    "tests/test_sharding.py::test_fsdp_on_sd3_and_with_a_network_the_method_holds": 66,
    "tests/test_sharding.py::test_fsdp_resume_after_sigkill_is_exact": 66,
    "tests/test_train.py::test_ddpo_raises_classifier_reward_on_digits": 58,
    "tests/test_sharding.py::test_fsdp_nft_anchor_is_sharded_swapped_and_resumed": 57,
    "tests/test_sharding.py::test_fsdp_on_a_tiny_stable_diffusion_folder": 48,
    "tests/test_constrained.py::test_constraint_raises_minority_share": 42,
    "tests/test_sharding.py::test_fsdp_two_processes_match_one_process_and_data_parallel": 38,
    "tests/test_train.py::test_resume_after_sigkill_matches_uninterrupted_run": 36,
    "tests/test_ddo.py::test_ddo_on_toy2d_moves_towards_the_optimum_and_saves_its_potential": 36,
    "tests/test_sharding.py::test_bench_memory_sharding_halves_the_state_per_process": 35,
    "tests/test_sharding.py::test_fsdp_on_a_flux_folder": 33,
    "tests/test_remote_rewards.py::test_a_server_killed_mid_run_is_retried_and_a_server_that_stays_down_stops_after_a_checkpoint": 31,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -SLOW_FIRST.get(item.nodeid, 0))  # stable: the rest keep their order
