import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DIFFALIGN_CACHE", str(ROOT / ".cache" / "diffalign"))
torch.set_num_threads(2)


@pytest.fixture
def tiny():
    from tiny_models import tiny_model

    return tiny_model()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state; every test starts (and ends) without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
