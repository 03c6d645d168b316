"""Distributed runtime: torchrun rank-per-device, broadcast / all-gather over NCCL or gloo (docs/design.md section 3).

Outside torchrun nothing is initialised and the local evaluator is used, so one process costs nothing extra; it
runs on `pick_device` (CUDA when available). Under torchrun, rank r uses cuda:LOCAL_RANK with NCCL (gloo on CPU);
every rank keeps its own model replica, evaluates its slots of each round, and the outputs are all-gathered into
the sampler's preallocated rows.

Timeouts: the process group is created with a long start-up timeout (`init_timeout_s`, which covers model loading:
a rank loading a large model slowly must not kill the job), `ready()` is a barrier after loading under that
timeout, and every collective of the runtime then runs on a subgroup and waits for its result with the short
`timeout_s` (`Work.wait(timeout)`). On NCCL that wait blocks the calling thread until the collective completes or
times out and raises, so a hung or dead peer is reported by the rank as CollectiveTimeout (as on gloo); the
subgroup's own timeout, after which NCCL's watchdog aborts the process, is `watchdog_grace` longer, as a backstop.
"""
import datetime
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
# torch.distributed.nn binds the default group (group.WORLD) as default arguments when it is first imported. Imported
# after init_process_group (diffusers imports it), it keeps the default group alive after destroy_process_group, so
# gloo's worker threads run on into interpreter shutdown, where one that drops a tensor needs the GIL and aborts the
# process ("terminate called without an active exception"). Imported here, before any group exists, it binds None.
import torch.distributed.nn  # noqa: F401,E402

from .evaluator import LocalEvaluator

DEFAULT_TIMEOUT_S = 60.0          # a collective of a running job
DEFAULT_INIT_TIMEOUT_S = 1800.0   # joining the job and loading the model on every rank
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# torch >= 2.13 names the single-tensor all-gather all_gather_single; older releases all_gather_into_tensor.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    group_ref: weakref.ref | None = None  # the runtime's group, see `group`
    timeout_s: float = DEFAULT_TIMEOUT_S
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S  # the default group's: start-up, loading, teardown

    @property
    def group(self):
        """The group the runtime's collectives run on (None: the default group). Held weakly: torch holds it until
        destroy_process_group, and a DistInfo kept by a caller must not keep the group (and its backend's worker
        threads) alive past `teardown`."""
        return self.group_ref() if self.group_ref is not None else None

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


_INFO: DistInfo | None = None  # the group maybe_init_dist created (one per process)


def check_device(spec: str) -> str:
    """Validate a --device value before anything starts; returns it. Raises ValueError naming what is allowed."""
    if spec in ("auto", "cpu", "cuda"):
        return spec
    if isinstance(spec, str) and spec.startswith("cuda:") and spec[5:].isdigit():
        return spec
    raise ValueError(f"device {spec!r} is not one of {DEVICE_CHOICES}")


def pick_device(spec: str = "auto") -> torch.device:
    """The device of a single process: auto = the current CUDA device when CUDA is available, else the CPU.

    Raises ValueError when a CUDA device is asked for and is not there. cuda:N also becomes the current device
    (kernels, graphs and events use the current device)."""
    check_device(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available in this process (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if spec in ("auto", "cuda") else int(spec[5:])
    if index >= count:
        raise ValueError(f"device {spec!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def rank_device(spec: str, local_rank: int, local_world: int | None = None) -> tuple:
    """(device, backend) of a torchrun rank: cuda:LOCAL_RANK with NCCL when CUDA is used, else the CPU with gloo.

    More ranks on this node (`local_world`, default torchrun's LOCAL_WORLD_SIZE) than visible CUDA devices is refused
    on EVERY rank, not only on the ranks whose LOCAL_RANK is past the device count: each rank then reports bad input
    (rank 0 prints it) and leaves at once, instead of the ranks that have a device waiting in NCCL's start-up for
    peers that already left."""
    check_device(spec)
    if spec.startswith("cuda:"):
        raise ValueError(f"device {spec!r}: under torchrun every rank uses cuda:LOCAL_RANK; choose the GPUs with "
                         f"CUDA_VISIBLE_DEVICES (and --device auto, cuda or cpu)")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available on this rank")
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    ranks_here, count = max(local_world, local_rank + 1), torch.cuda.device_count()
    if ranks_here > count:
        raise ValueError(f"{ranks_here} ranks on this node but only {count} CUDA device(s) visible: start at most "
                         f"one rank per GPU (NCCL cannot share a device between ranks; --nproc_per_node={count}, or "
                         f"make more GPUs visible with CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank), "nccl"


def watchdog_grace(timeout_s: float) -> float:
    """How much longer than the runtime's wait the group's own (watchdog) timeout is."""
    return max(5.0, 0.1 * timeout_s)


def maybe_init_dist(timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "auto",
                    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S) -> DistInfo | None:
    """Join the torchrun job (more than one process) and return its DistInfo; None outside torchrun.

    The CUDA device is set before init_process_group (NCCL binds a communicator to the current device). The default
    group gets the long `init_timeout_s` (start-up, model loading, `ready`, `teardown`); the runtime's collectives
    run on a subgroup of every rank with the short `timeout_s`. Calling it again returns the same DistInfo."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    if _INFO is not None and dist.is_initialized():
        return _INFO
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev, backend = rank_device(device, local_rank)
    if backend == "nccl":
        torch.cuda.set_device(dev)
    init_timeout_s = max(init_timeout_s, timeout_s)
    if not dist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=init_timeout_s), **kw)
    # The group's own timeout (NCCL's watchdog aborts the process when it passes) is a little longer than the
    # runtime's wait, so that a rank reports a hung peer itself first; the watchdog stays the backstop.
    group_timeout = datetime.timedelta(seconds=timeout_s + watchdog_grace(timeout_s))
    group = dist.new_group(timeout=group_timeout, backend=backend)
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, weakref.ref(group), timeout_s,
                     init_timeout_s)
    return _INFO


def ready(info: DistInfo | None):
    """Barrier after every rank loaded its model, under the long start-up timeout: from here on a rank that does
    not answer within the short timeout is hung or dead, not slow to load."""
    if info is not None:
        barrier("the barrier after loading", info, datetime.timedelta(seconds=info.init_timeout_s))


def barrier(name: str, info: DistInfo, timeout: datetime.timedelta):
    """A barrier of every rank (default group) that waits at most `timeout`; a peer that is gone or silent raises
    CollectiveTimeout. dist.barrier takes no `timeout` before torch 2.13, so the barrier is started asynchronously
    and its work waited for with the timeout (Work.wait(timeout) exists on every supported release); the barrier
    op itself runs under the default group's timeout, the long start-up one."""
    kw = {"device_ids": [info.device.index]} if info.backend == "nccl" else {}
    t0 = time.monotonic()
    try:
        work = dist.barrier(async_op=True, **kw)
        if work is not None:
            work.wait(timeout=timeout)
    except RuntimeError as e:
        raise _peer_failure(name, e, info.rank, timeout, time.monotonic() - t0) or e


def rank0_agrees(info: DistInfo | None, ok: bool) -> bool:
    """Rank 0's verdict on every rank (start-up checks before the model loads), under the long start-up timeout."""
    if info is None:
        return bool(ok)
    flag = torch.tensor([int(bool(ok))], dtype=torch.int32, device=info.device)
    dist.broadcast(flag, 0, async_op=True).wait(timeout=datetime.timedelta(seconds=info.init_timeout_s))
    return bool(flag.item())


def broadcast_bytes(info: DistInfo | None, data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (the length, then the bytes: two broadcasts on the default group, under the
    long start-up timeout); outside torchrun `data` itself."""
    if info is None:
        return data
    timeout = datetime.timedelta(seconds=info.init_timeout_s)
    n = torch.tensor([len(data) if info.rank == 0 else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(n, 0, async_op=True).wait(timeout=timeout)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=info.device)
    if info.rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0, async_op=True).wait(timeout=timeout)
    return bytes(buf.cpu().numpy())


def teardown(info: DistInfo | None):
    """Leave the job cleanly (every rank, on success or on an error every rank agreed on): a barrier under the
    long timeout (rank 0 may still be writing outputs), then destroy every group, which joins the backends'
    worker threads before the interpreter shuts down. Not for a broken group: use `exit_now` there."""
    global _INFO
    if info is None or not dist.is_initialized():
        return
    try:
        barrier("the barrier before leaving", info, datetime.timedelta(seconds=info.init_timeout_s))
    finally:
        dist.destroy_process_group()
        _INFO = None


def exit_now(code: int):
    """Leave a broken job at once: no teardown (a collective with a dead peer can block it) and no interpreter
    shutdown with backend threads still running. Output is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def is_root() -> bool:
    """Whether this process is rank 0 of its job (True outside torchrun): the rank that decodes and reports."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def current() -> DistInfo | None:
    """The process group this process already joined (world > 1), or None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if _INFO is not None:
        return _INFO
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


# How a collective's error reads when a peer is gone: the transport says so at once (gloo, NCCL's socket bootstrap)...
_PEER_GONE = ("Connection closed", "Connection reset", "remote process exited", "Broken pipe", "closed by peer")
# ...or the wait ran out (gloo, NCCL's blocking wait), or NCCL aborted the communicator (after a timeout or a peer's
# error: which one, its text does not say)
_PEER_SILENT = ("imed out", "was aborted")


class CollectiveTimeout(RuntimeError):
    """A collective failed because another rank is hung or dead: the wait timed out, or the transport said the peer
    closed its connection. The message does not name this rank (whoever prints it does, once); `rank` holds it."""

    rank: int | None = None


def _peer_failure(name: str, e: RuntimeError, rank: int, timeout: datetime.timedelta, elapsed: float | None = None):
    """A CollectiveTimeout for a backend error that says a peer is gone or silent (None for other errors).

    A peer whose connection closed, was reset or whose process exited has died: said so, with how long the collective
    had waited (a fraction of a second is common), not reported as a timeout it never reached."""
    text = str(e)
    gone = any(s in text for s in _PEER_GONE)
    if not gone and not any(s in text for s in _PEER_SILENT):
        return None
    detail = text.splitlines()[0] if text.strip() else type(e).__name__
    limit = timeout.total_seconds()
    if gone and (elapsed is None or elapsed < limit):
        after = f" after {elapsed:.2f} s" if elapsed is not None else ""
        msg = f"{name} failed{after}: another rank has died (the connection to it closed: {detail})"
    elif "was aborted" in text and (elapsed is None or elapsed < limit):
        after = f" after {elapsed:.2f} s" if elapsed is not None else ""
        msg = f"{name} failed{after}: the group was aborted: another rank is hung or has died ({detail})"
    else:
        msg = f"{name} did not complete within {limit:g} s: another rank is hung or has died ({detail})"
    err = CollectiveTimeout(msg)
    err.rank = rank
    err.__cause__ = e
    return err


def collective(name: str, fn, *args, info: DistInfo | None = None, group=None):
    """Run collective `fn(*args)` on the runtime's group (or `group`, a subgroup of it such as a layout's) and wait
    for it with the runtime's timeout (explicitly, so NCCL blocks this thread and raises on a timeout instead of
    leaving it to the watchdog)."""
    info = info or current()
    timeout = info.timeout if info else datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    group = group if group is not None else (info.group if info else None)
    t0 = time.monotonic()
    try:
        work = fn(*args, group=group, async_op=True)
        if work is not None:
            work.wait(timeout=timeout)
    except RuntimeError as e:  # torch's DistBackendError and gloo's errors are RuntimeErrors
        raise _peer_failure(name, e, info.rank if info else dist.get_rank(), timeout, time.monotonic() - t0) or e


def all_gather_rows(out: torch.Tensor, inp: torch.Tensor, info: DistInfo | None = None, group=None):
    """All-gather equal row chunks into `out` = concatenation along dim 0 (gloo rejects a stacked [world, ...] out),
    over the runtime's group or `group`."""
    world = dist.get_world_size(group) if group is not None else (info.world if info else dist.get_world_size())
    if out.shape[0] != world * inp.shape[0] or out.shape[1:] != inp.shape[1:]:
        raise ValueError(f"all-gather output {tuple(out.shape)} must concatenate {world} inputs {tuple(inp.shape)} "
                         f"along dim 0 (a stacked [world, ...] output is not supported)")
    collective("all_gather", _ALL_GATHER, out, inp, info=info, group=group)


class DistributedEvaluator(LocalEvaluator):
    """Rank r evaluates slots [r*c, (r+1)*c) of a round of k points (c = ceil(k / world)) and all-gathers them.

    Ranks with no slot in a round still join the collectives. The send buffer is allocated once per
    (latent shape, dtype, chunk) and reused by every round and request. With a `layout` (layout.Layout) that splits
    calls, rank and world are the draft coordinates: the drafts are spread and gathered over the layout's draft
    dim, the ranks of a cfg pair and of a sequence group evaluate the same points together (each its half of the
    guided call, its share of the tokens), and what every rank of the job must share (the generator state,
    decisions) still goes to every rank."""

    def __init__(self, model, info: DistInfo, layout=None):
        super().__init__(model)
        self.info, self.rank, self.world = info, info.rank, info.world
        self.replicas, self.is_root = info.world, info.rank == 0
        self.layout = layout if layout is not None and layout.splits else None
        if self.layout is not None:
            self.rank, self.world = layout.draft_rank, layout.draft
        self._send = {}
        self._flag = torch.zeros(1, dtype=torch.int32, device=info.device)

    def chunk(self, k: int) -> int:
        return math.ceil(k / self.world)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        collective("broadcast", dist.broadcast, t, 0, info=self.info)
        return t

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (one 4-byte broadcast)."""
        self._flag.fill_(int(bool(flag)))
        return bool(self.broadcast(self._flag).item())

    def anchor(self, call, states, idx: tuple, out) -> torch.Tensor:
        """With one GPU per rank every rank evaluates the anchor itself: the redundant call costs no latency and
        saves a collective on the critical path (fixed-cost model, 2 gloo ranks, conservative S=20 n=2: 603 ms
        against 611 ms with a broadcast). CPU ranks share cores, where the redundant call slows both: there rank 0
        evaluates and broadcasts (measured in perf/results/latency.md)."""
        if self.info.device.type == "cuda" or self.layout is not None:  # (split calls evaluate it together)
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
        all_gather_rows(gathered, send, self.info, self.layout.draft_group if self.layout is not None else None)
        return gathered

    def check_in_step(self, t: torch.Tensor, where: str):
        """Debug check that every rank holds the same bits of `t` (one all-gather of a checksum)."""
        bits = t.detach().contiguous().view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                                      8: torch.int64}[t.element_size()]).to(torch.int64)
        local = (bits * torch.arange(1, bits.numel() + 1, device=bits.device)).sum().view(1)  # wraps mod 2^64
        every = torch.empty(self.replicas, dtype=torch.int64, device=t.device)
        all_gather_rows(every, local, self.info)
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"rank {self.rank}: ranks hold different bits {where} (checksums {every.tolist()}); "
                               f"the model or a kernel is not deterministic across ranks")


def default_evaluator(model, layout=None):
    """The distributed evaluator inside a torchrun process group (over `layout`'s draft dim when given), the local
    one otherwise."""
    info = current()
    return LocalEvaluator(model) if info is None else DistributedEvaluator(model, info, layout)
