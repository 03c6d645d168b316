"""CUDA-graph replay of a rank's model call (GPU only; docs/design.md section 3).

A model call is captured once per (rows, latent shape, dtype, kwargs signature) on static buffers: the input
x_in, the per-row timesteps (a device tensor, so no host sync) and the tiled model kwargs. Each round copies its
inputs into those buffers and replays; collectives stay outside the graph.

Memory stays bounded: every graph of a cache allocates from one shared memory pool (graphs replay one at a time on
one stream, so their transient buffers can share it) and the cache keeps at most `size` graphs (least recently used
evicted). Non-tensor kwargs are baked into a graph and keyed by value, except for a model that declares
`tensor_scalars = True` (the pipeline adapters): its float kwargs (guidance_scale, guidance_rescale,
true_cfg_scale, ...) reach the captured call as 0-d float64 tensors on the latent's device, refilled before each
replay, so a new guidance value replays the graph already captured. Such a model must accept those tensors without a
host sync (no `if scale > 1:` on them: such decisions go in non-float kwargs, keyed by value). A model that cannot be
captured at all declares `cuda_graphs = False` (evaluator.ModelCall then runs it eagerly). Written against the
documented torch.cuda.CUDAGraph / torch.cuda.graph API; perf/gpu_proof.py checks graphs on == off on a GPU.
"""
from collections import OrderedDict

import torch


def _is_float(value) -> bool:
    return isinstance(value, float) and not isinstance(value, bool)


def _signature(value, scalars: bool):
    """A hashable description of kwargs: tensor shapes/dtypes, the type of floats if they are passed as tensors
    (`scalars`; their values are replayed), and the values of everything else (baked into the graph)."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device)
    if scalars and _is_float(value):
        return ("F",)
    if isinstance(value, dict):
        return tuple((k, _signature(v, scalars)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v, scalars) for v in value)
    return ("V", repr(value))


def _static_like(value, device, scalars: bool):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if scalars and _is_float(value):
        return torch.tensor(value, dtype=torch.float64, device=device)
    if isinstance(value, dict):
        return {k: _static_like(v, device, scalars) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_static_like(v, device, scalars) for v in value)
    return value


def _copy_into(static, value):
    if isinstance(static, torch.Tensor):
        if isinstance(value, torch.Tensor):
            static.copy_(value, non_blocking=True)
        else:
            static.fill_(value)  # a float: a fill kernel with the value as its argument, no host-to-device copy
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], value[k])
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)


class CaptureError(RuntimeError):
    """The model call could not be captured in a CUDA graph."""


class _Captured:
    def __init__(self, fn, x, t, kwargs, capture, pool, scalars):
        self.x, self.t, self.kwargs = x.clone(), t.clone(), _static_like(kwargs, x.device, scalars)
        self.replay, self.y = capture(lambda: fn(self.x, self.t, **self.kwargs), pool)


def cuda_capture(run, pool=None, warmup: int = 2):
    """Warm up on a side stream (as the CUDA-graph docs require), capture `run` into `pool` (a
    torch.cuda.graph_pool_handle shared by the cache's graphs), return (replay, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (a server's, a telemetry sampler's) do not invalidate the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        y = run()
    return graph.replay, y


def _new_pool():
    return torch.cuda.graph_pool_handle()


class GraphCache:
    """Persistent captured model calls of one replica, reused across rounds and requests: at most `size` graphs
    (least recently used evicted), all in one memory pool. `capture(run, pool)` and `new_pool()` are injectable
    (tests replace them with CPU stand-ins)."""

    def __init__(self, capture=cuda_capture, size: int = 16, new_pool=_new_pool):
        if size < 1:
            raise ValueError(f"GraphCache size must be >= 1, got {size}")
        self.capture, self.size, self.new_pool = capture, size, new_pool
        self.graphs = OrderedDict()
        self.pool = None
        self.captures = 0  # graphs captured over the cache's life (evicted ones included)

    def __call__(self, fn, x, t, kwargs, scalars: bool = False) -> torch.Tensor:
        """fn(x, t, **kwargs) through the graph of its key, captured on first use. scalars: pass float kwargs as
        0-d device tensors (the model declared `tensor_scalars = True`)."""
        key = (tuple(x.shape), x.dtype, x.device, tuple(t.shape), scalars, _signature(kwargs, scalars))
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(key, fn, x, t, kwargs, scalars)
        else:
            self.graphs.move_to_end(key)
        g.x.copy_(x, non_blocking=True)
        g.t.copy_(t, non_blocking=True)
        _copy_into(g.kwargs, kwargs)
        g.replay()
        return g.y

    def _capture(self, key, fn, x, t, kwargs, scalars) -> _Captured:
        if len(self.graphs) >= self.size:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)  # the evicted graph's last replay has finished with its memory
            self.graphs.popitem(last=False)
        if self.pool is None:
            self.pool = self.new_pool()
        try:
            g = _Captured(fn, x, t, kwargs, self.capture, self.pool, scalars)
        except RuntimeError as e:
            if "captur" not in str(e).lower():
                raise
            raise CaptureError(
                f"the model call could not be captured in a CUDA graph ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"A captured model must not synchronise with the host (.item(), .tolist(), branching on a tensor, "
                f"host-to-device copies of pageable memory). Set `cuda_graphs = False` on the model, or run with "
                f"cuda_graphs=False (--no-cuda-graphs), to run it eagerly") from e
        self.graphs[key] = g
        self.captures += 1
        return g
