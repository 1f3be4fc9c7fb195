import os
import warnings

import pytest
import torch

# Kernel tests run through Triton's interpreter on CPU and compiled on a CUDA GPU (the kernel
# tests then put their tensors there); must be set before any @triton.jit module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*is deprecated.*")

# One intra-op thread per test process: the tests' tensors are tiny, where a second thread costs more in
# synchronisation than it gains, and pytest-xdist runs one test process per core (pyproject's addopts).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
