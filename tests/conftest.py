"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorates, so it is set here, first.

On a GPU machine, DRIFFUSION_TEST_GPU=1 runs the kernels compiled for real instead of interpreted.
"""
import os

if os.environ.get("DRIFFUSION_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def device():
    return torch.device("cuda" if os.environ.get("DRIFFUSION_TEST_GPU") == "1" else "cpu")
