"""CUDA-graph replay of a rank's model call (GPU only; DESIGN.md section 3, step 3).

A model call is captured once per (rows, latent shape, dtype, kwargs signature) on static buffers: the input
x_in, the per-row timesteps (a device tensor, so no host sync) and the tiled model kwargs. Each round copies its
inputs into those buffers and replays; collectives stay outside the graph. Written against the documented
torch.cuda.CUDAGraph / torch.cuda.graph API; perf/gpu_selfcheck.sh checks graphs on and off give equal results.
"""
import torch


def _signature(value):
    """A hashable description of kwargs: tensor shapes/dtypes, and the values of everything else (baked in)."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return ("V", repr(value))


def _static_like(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _static_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_static_like(v) for v in value)
    return value


def _copy_into(static, value):
    if isinstance(static, torch.Tensor):
        static.copy_(value, non_blocking=True)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], value[k])
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)


class _Captured:
    def __init__(self, fn, x, t, kwargs, capture):
        self.x, self.t, self.kwargs = x.clone(), t.clone(), _static_like(kwargs)
        self.replay, self.y = capture(lambda: fn(self.x, self.t, **self.kwargs))


def cuda_capture(run, warmup: int = 2):
    """Warm up on a side stream (as the CUDA-graph docs require), capture `run`, return (replay, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    return graph.replay, y


class GraphCache:
    """Persistent captured model calls of one replica, reused across rounds and requests."""

    def __init__(self, capture=cuda_capture):
        self.capture = capture
        self.graphs = {}

    def __call__(self, fn, x, t, kwargs) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, tuple(t.shape), _signature(kwargs))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _Captured(fn, x, t, kwargs, self.capture)
        g.x.copy_(x, non_blocking=True)
        g.t.copy_(t, non_blocking=True)
        _copy_into(g.kwargs, kwargs)
        g.replay()
        return g.y
