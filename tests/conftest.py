"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorates, so it is set here, first.

On a GPU machine, DRIFFUSION_TEST_GPU=1 runs the kernels compiled for real instead of interpreted.
"""
import os

if os.environ.get("DRIFFUSION_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: per-op overhead dominates, and one intra-op thread is much faster than two on a
# loaded 2-core machine (torchrun tests start their own processes with OMP_NUM_THREADS=1 too).
torch.set_num_threads(1)


@pytest.fixture
def device():
    return torch.device("cuda" if os.environ.get("DRIFFUSION_TEST_GPU") == "1" else "cpu")
