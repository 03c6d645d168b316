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


def _spend(seconds: float, like: torch.Tensor):
    """`seconds` of host sleep (CPU) or device spin queued behind `like` (GPU)."""
    if like.is_cuda:
        if seconds > 0:
            torch.cuda._sleep(max(1, int(seconds * cycles_per_second(like.device))))
    else:
        time.sleep(seconds)


class FixedCostDenoiser(torch.nn.Module):
    """A denoiser call that costs `seconds` plus `per_row` seconds per batch row (a compute-bound model's cost grows
    with its batch: in-rank classifier-free guidance doubles it) and returns a cheap function of (x, t, branch).
    Split over a sequence group of `sequence` ranks (a modeled split: nothing is exchanged), each rank's per-row
    cost is divided by the degree and every call adds `sequence_comm` seconds for the attention exchanges."""

    def __init__(self, seconds: float = 0.04, per_row: float = 0.0, sequence_comm: float = 0.0):
        super().__init__()
        for name, v in (("seconds", seconds), ("per_row", per_row), ("sequence_comm", sequence_comm)):
            if not v >= 0:
                raise ValueError(f"fixed-cost model: {name} must be >= 0, got {v}")
        self.seconds, self.per_row, self.sequence_comm, self.sequence = seconds, per_row, sequence_comm, 1

    def cost(self, rows: int) -> float:
        """Seconds one call of `rows` rows costs this rank."""
        split = self.sequence_comm if self.sequence > 1 else 0.0
        return self.seconds + self.per_row * rows / self.sequence + split

    def forward(self, x: torch.Tensor, t: torch.Tensor, branch: torch.Tensor | None = None) -> torch.Tensor:
        _spend(self.cost(x.shape[0]), x)
        scale = 0.1 + t.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) / 1e4
        if branch is not None:  # uncond (0) and cond (1) rows answer differently, as a guided model's do
            scale = scale + 0.01 * branch.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return x * scale


class FixedCostModel:
    """model(x_in, t) -> a cheap deterministic function of (x_in, t) after `seconds` (+ `per_row` per row) of host or
    device sleep. With guidance != 0 it is a guided model: the uncond and cond rows go through the denoiser as one
    doubled call (as every pipeline adapter does) and are combined with the guidance scale, so cfg-parallel layouts
    can be benchmarked without a real model; under a sequence-parallel layout its cost models the split (see
    FixedCostDenoiser), so layouts with a sequence axis can be benchmarked too."""

    cuda_graphs = True  # capturable: the device sleep and the arithmetic are kernels, nothing syncs

    def __init__(self, seconds: float = 0.04, per_row: float = 0.0, guidance: float = 0.0,
                 sequence_comm: float = 0.0):
        self.denoiser = FixedCostDenoiser(seconds, per_row, sequence_comm)
        self.seconds, self.guidance = seconds, guidance

    def guided(self, model_kwargs: dict) -> bool:
        return bool(self.guidance)

    def context_parallel(self, group):
        """A sequence group (sequence.py): each rank's calls cost what its share of the tokens would."""
        self.denoiser.sequence = group.degree

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        if not self.guidance:
            return self.denoiser(x_in, t)
        n = x_in.shape[0]
        branch = torch.cat([torch.zeros(n, device=x_in.device), torch.ones(n, device=x_in.device)])
        uncond, cond = self.denoiser(torch.cat([x_in, x_in]), torch.cat([t, t]), branch).chunk(2)
        return uncond + self.guidance * (cond - uncond)
