"""Distributed runtime: torchrun rank-per-device, broadcast / all-gather over NCCL or gloo (DESIGN.md section 3).

Outside torchrun nothing is initialised and the local evaluator is used, so one process costs nothing extra.
Under torchrun, rank r uses cuda:LOCAL_RANK with NCCL (gloo on CPU); every rank keeps its own model replica,
evaluates its slots of each round, and the outputs are all-gathered into the sampler's preallocated rows.
"""
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .evaluator import LocalEvaluator

DEFAULT_TIMEOUT_S = 60.0
# torch >= 2.13 names the single-tensor all-gather all_gather_single; older releases all_gather_into_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str


def maybe_init_dist(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo | None:
    """Initialise the process group when launched by torchrun with more than one process; None otherwise.

    The CUDA device is set before init_process_group (NCCL binds a communicator to the current device) and the
    group always has an explicit timeout: a dead or hung rank must fail the job, not block it for 30 minutes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def current() -> DistInfo | None:
    """The process group this process already joined (world > 1), or None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout: another rank is hung or dead."""


def _collective(name: str, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:
        text = str(e)
        if "imed out" in text or "Connection closed" in text or "Connection reset" in text:
            raise CollectiveTimeout(
                f"rank {dist.get_rank()}: {name} did not complete: another rank is hung or has died ({text.splitlines()[0]})"
            ) from e
        raise


def all_gather_rows(out: torch.Tensor, inp: torch.Tensor):
    """All-gather equal row chunks into `out` = concatenation along dim 0 (gloo rejects a stacked [world, ...] out)."""
    world = dist.get_world_size()
    if out.shape[0] != world * inp.shape[0] or out.shape[1:] != inp.shape[1:]:
        raise ValueError(f"all-gather output {tuple(out.shape)} must concatenate {world} inputs {tuple(inp.shape)} "
                         f"along dim 0 (a stacked [world, ...] output is not supported)")
    _collective("all_gather", _ALL_GATHER, out, inp)


class DistributedEvaluator(LocalEvaluator):
    """Rank r evaluates slots [r*c, (r+1)*c) of a round of k points (c = ceil(k / world)) and all-gathers them.

    Ranks with no slot in a round still join the collectives. The send buffer is allocated once per
    (latent shape, dtype, chunk) and reused by every round and request."""

    def __init__(self, model, info: DistInfo):
        super().__init__(model)
        self.info, self.rank, self.world = info, info.rank, info.world
        self._send = {}

    def chunk(self, k: int) -> int:
        return math.ceil(k / self.world)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        _collective("broadcast", dist.broadcast, t, 0)
        return t

    def anchor(self, call, states, idx: tuple, out) -> torch.Tensor:
        """With one GPU per rank every rank evaluates the anchor itself: the redundant call costs no latency and
        saves a collective on the critical path (fixed-cost model, 2 gloo ranks, conservative S=20 n=2: 603 ms
        against 611 ms with a broadcast). CPU ranks share cores, where the redundant call slows both: there rank 0
        evaluates and broadcasts (measured in perf/results/latency.md)."""
        if self.info.device.type == "cuda":
            return call(states, idx, out)
        if self.rank == 0:
            call(states, idx, out)
        return self.broadcast(out)

    def send_buffer(self, gathered) -> torch.Tensor:
        c = gathered.shape[0] // self.world
        key = (tuple(gathered.shape[1:]), gathered.dtype, gathered.device)
        send = self._send.get(key)
        if send is None or send.shape[0] < c:
            send = self._send[key] = torch.zeros(c, *gathered.shape[1:], dtype=gathered.dtype, device=gathered.device)
        return send[:c]

    def gather(self, gathered, send) -> torch.Tensor:
        all_gather_rows(gathered, send)
        return gathered

    def check_in_step(self, t: torch.Tensor, where: str):
        """Debug check that every rank holds the same bits of `t` (one all-gather of a checksum)."""
        bits = t.detach().contiguous().view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                                      8: torch.int64}[t.element_size()]).to(torch.int64)
        local = (bits * torch.arange(1, bits.numel() + 1, device=bits.device)).sum().view(1)  # wraps mod 2^64
        every = torch.empty(self.world, dtype=torch.int64, device=t.device)
        all_gather_rows(every, local)
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"rank {self.rank}: ranks hold different bits {where} (checksums {every.tolist()}); "
                               f"the model or a kernel is not deterministic across ranks")


def default_evaluator(model):
    """The distributed evaluator inside a torchrun process group, the local one otherwise."""
    info = current()
    return LocalEvaluator(model) if info is None else DistributedEvaluator(model, info)
