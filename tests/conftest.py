import os

import pytest
import torch

# Tests run on the CPU unless TURBOVAE_DEVICE says otherwise (the GPU script sets it to cuda).
DEVICE = os.environ.get("TURBOVAE_DEVICE", "cpu")


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
