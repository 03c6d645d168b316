"""A model whose every call costs a fixed time without doing work: on a CPU it sleeps, on a GPU it spins the device.

With it, a benchmark measures the runtime's own overhead: the ideal latency is exactly
serial_rounds x cost, and anything above that is drafting, collectives, refine and Python.
On a GPU the cost is a device-side sleep (torch.cuda._sleep, a spin kernel of a calibrated number of clock
cycles): it queues behind the call's inputs like a real model, leaves the host free, and can be captured in a CUDA
graph (a host sleep would happen once at capture and never on replay).
"""
import time

import torch

_CYCLES_PER_S = {}  # device index -> clock cycles per second of torch.cuda._sleep, measured once


def cycles_per_second(device: torch.device) -> float:
    """Calibrate torch.cuda._sleep on `device`: time a long spin with CUDA events (once per device and process).
    Not allowed while a CUDA graph is being captured (it synchronises)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _CYCLES_PER_S:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("FixedCostModel: calibrate torch.cuda._sleep before capturing (call the model once "
                               "eagerly first; GraphCache's warm-up does)")
        with torch.cuda.device(index):
            cycles = 20_000_000
            torch.cuda._sleep(cycles // 10)  # wake the clocks up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            _CYCLES_PER_S[index] = cycles / (start.elapsed_time(end) / 1e3)
    return _CYCLES_PER_S[index]


class FixedCostModel:
    """model(x_in, t) -> a cheap deterministic function of (x_in, t) after `seconds` of (host or device) sleep."""

    cuda_graphs = True  # capturable: the device sleep and the arithmetic are kernels, nothing syncs

    def __init__(self, seconds: float = 0.04):
        if seconds < 0:
            raise ValueError(f"fixed-cost model: seconds must be >= 0, got {seconds}")
        self.seconds = seconds

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        if x_in.is_cuda:
            if self.seconds > 0:
                torch.cuda._sleep(max(1, int(self.seconds * cycles_per_second(x_in.device))))
        else:
            time.sleep(self.seconds)
        scale = 0.1 + t.to(x_in.dtype).view(-1, *[1] * (x_in.dim() - 1)) / 1e4
        return x_in * scale
