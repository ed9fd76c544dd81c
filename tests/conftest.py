import os

os.environ.setdefault("MPLBACKEND", "Agg")
# The suite's models are small: one intra-op thread is fastest for them, and on a shared 2-core machine
# more threads spin against each other (a 64-wide Linear measured 4 ms under load with the default
# threads). Child processes (CLI runs, DDP ranks) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def one_thread():
    """Small products run fastest (and time reproducibly on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
