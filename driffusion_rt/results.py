"""What a sampling run returns (the sample, its measured stats) and how the phases of its rounds are timed."""
import os
import time
from dataclasses import dataclass, field

import torch

from .evaluator import ModelOutputError
from .plan import Plan


class NonFiniteOutputError(ModelOutputError):
    """A model output contained NaN or inf."""


class Cancelled(RuntimeError):
    """The caller cancelled the request (`cancel` was set on rank 0); every rank stopped at the same round."""


@dataclass
class SampleStats:
    mode: str
    steps: int
    parallel: int
    serial_rounds: int = 0           # counted while executing, not read off the plan
    model_evals: int = 0
    batch_widths: list = field(default_factory=list)  # points per serial model call, in order (anchor calls are 1)
    wall_time: float = 0.0
    ideal_speedup: float = 0.0       # the plan's S / serial_rounds
    phases: dict = field(default_factory=dict)  # seconds per phase: draft, model, comm, refine, check
    batch_requests: int = 1          # the most requests that shared one of its model calls (batch.py)


@dataclass
class SampleOutput:
    sample: torch.Tensor
    stats: SampleStats
    plan: Plan = None
    host: torch.Tensor | None = None  # CUDA runs: the result in page-locked host memory, reused by the next request

    def cpu(self) -> torch.Tensor:
        """The result on the host (from the pinned copy when there is one)."""
        if self.host is None:
            return self.sample.cpu()
        torch.cuda.current_stream().synchronize()  # the pinned copy was queued without a sync
        return self.host.clone()


NVTX = os.environ.get("DRIFFUSION_NVTX") == "1"  # perf/nsys.sh sets it; otherwise ranges cost nothing


class Clock:
    """Per-phase time of a run: perf_counter on CPU; CUDA events on GPU, resolved once at the end (no per-round
    sync). With DRIFFUSION_NVTX=1 on CUDA, every round and phase is also an NVTX range for Nsight Systems."""

    PHASES = ("draft", "model", "comm", "refine", "check")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.nvtx = NVTX and self.cuda
        self.t = dict.fromkeys(self.PHASES, 0.0)
        self.marks, self.phase, self.in_round = [], None, False
        self.last = self._mark()

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self, phase: str | None):
        """End the current phase (charging its time) and start `phase` (None: stop)."""
        now = self._mark()
        if self.phase is not None:
            if self.cuda:
                self.marks.append((self.phase, self.last, now))
            else:
                self.t[self.phase] += now - self.last
            if self.nvtx:
                torch.cuda.nvtx.range_pop()
        if phase is not None and self.nvtx:
            torch.cuda.nvtx.range_push(phase)
        self.phase, self.last = phase, now

    def round(self, r: int | None):
        """NVTX range around round r (None closes the last one)."""
        if self.nvtx:
            self.start(None)
            if self.in_round:
                torch.cuda.nvtx.range_pop()
            if r is not None:
                torch.cuda.nvtx.range_push(f"round {r}")
        self.in_round = r is not None

    def stop(self) -> dict:
        """End the current phase and return seconds per phase."""
        self.start(None)
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            for phase, a, b in self.marks:
                self.t[phase] += a.elapsed_time(b) / 1e3
            self.marks.clear()
        return self.t
