"""A model whose every call costs a fixed wall time without holding a CPU core (it sleeps).

With it, a benchmark measures the runtime's own overhead: the ideal latency is exactly
serial_rounds x cost, and anything above that is drafting, collectives, refine and Python.
"""
import time

import torch


class FixedCostModel:
    """model(x_in, t) -> a cheap deterministic function of (x_in, t) after sleeping `seconds` per call."""

    def __init__(self, seconds: float = 0.04):
        if seconds < 0:
            raise ValueError(f"fixed-cost model: seconds must be >= 0, got {seconds}")
        self.seconds = seconds

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        if x_in.is_cuda:
            torch.cuda.synchronize(x_in.device)  # the cost starts when the inputs are ready, as for a real model
        time.sleep(self.seconds)
        scale = 0.1 + t.to(x_in.dtype).view(-1, *[1] * (x_in.dim() - 1)) / 1e4
        return x_in * scale
