import os
import warnings

import pytest
import torch

# Kernel tests run through Triton's interpreter on CPU and compiled on a CUDA GPU (the kernel
# tests then put their tensors there); must be set before any @triton.jit module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*is deprecated.*")


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
