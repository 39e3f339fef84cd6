import os

# One CPU thread per test process unless TURBOVAE_TEST_THREADS says otherwise: on a 2-core machine
# shared with other processes, two torch threads per process were measured up to 17× slower than one
# (OpenMP barriers; a small conv step 136 ms against 8 ms). Set before torch is imported, so that
# subprocesses (the CLI, torchrun ranks) inherit it too.
THREADS = int(os.environ.get("TURBOVAE_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# train.precision auto and train.threads 0 decide by timing the step (engine/hardware.py): a timing
# would make the numbers of two runs in one test differ now and then. The tests of that measurement
# set TURBOVAE_PROBE=1 themselves.
os.environ.setdefault("TURBOVAE_PROBE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests run on the CPU unless TURBOVAE_DEVICE says otherwise (the GPU script sets it to cuda).
DEVICE = os.environ.get("TURBOVAE_DEVICE", "cpu")


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed and thread count: a run with train.threads=N sets torch's
    threads for the whole process, which would otherwise leak into the tests after it."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)
