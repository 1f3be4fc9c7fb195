import os

# Kernel tests run through Triton's interpreter on CPU; must be set before any @triton.jit import.
if os.environ.get("CUDA_VISIBLE_DEVICES", "") == "" or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py for every subfolder
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
