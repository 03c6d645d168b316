"""torchrun worker: the generate CLI in a process made to believe it has FAKE_CUDA_DEVICES CUDA devices (default 1).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/one_gpu_worker.py GENERATE_ARGS...

Two ranks on one GPU must be refused before any CUDA or NCCL call, on every rank (tests/test_distributed.py, and
perf/gpu_proof.py's CPU dry run): so any use of a device here fails loudly instead of touching the real CUDA runtime.
"""
import os
import runpy
import sys

import torch

COUNT = int(os.environ.get("FAKE_CUDA_DEVICES", "1"))


def _too_late(*args, **kwargs):
    raise RuntimeError("one_gpu_worker: a CUDA device was used; too many ranks must be refused before that")


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: COUNT
torch.cuda.set_device = _too_late
torch.cuda.current_device = _too_late

if __name__ == "__main__":
    sys.argv = ["driffusion_rt.generate", *sys.argv[1:]]
    runpy.run_module("driffusion_rt.generate", run_name="__main__", alter_sys=True)
