"""Evaluators: given k (state, trajectory index) points, produce their k model outputs (docs/design.md section 3).

`ModelCall` turns a batch of trajectory points into one model call with the conventions of a diffusers
pipeline loop (scale_model_input, one timestep per batch row, model kwargs tiled to the batch).
`LocalEvaluator` runs every point of a round as one batched call on one device; the distributed evaluator
(driffusion_rt.distributed) has the same interface and spreads the points over ranks. `call_parts` makes one model
call of the points of several requests (step-level batching, batch.py) whose calls `can_share` rows.
Nothing here knows about drafts, anchors or plans.
"""
import contextvars

import torch

_ROWS = contextvars.ContextVar("driffusion_call_rows", default=None)


def call_rows() -> int | None:
    """The rows of the runtime model call in progress (None outside one): lets a layout's hooks recognise the
    adapter's doubled classifier-free-guidance call (layout.py)."""
    return _ROWS.get()


class ModelOutputError(ValueError):
    """The model returned something the sampler cannot use (wrong type or shape, non-finite values)."""


def _as_tensor(y):
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "sample") and isinstance(y.sample, torch.Tensor):  # diffusers ModelOutput
        return y.sample
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    raise ModelOutputError(f"the model returned {type(y).__name__}; it must return a tensor shaped like its input")


class Shared:
    """Marks a model kwarg that is the same for every point of a call, so it is never repeated for the drafts
    (e.g. Flux's text/image position ids, whose first dim is a token count that may equal the batch by chance).
    The model receives the wrapped value itself."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class PerStep:
    """Marks a model kwarg that depends on the trajectory index: `table` is [S, ...], row j its value at index j.
    The model receives the rows of the call's points, one per latent batch row (like the timesteps), so points at
    different indices in one call each get their own (e.g. ControlNet's conditioning scale, which
    control_guidance_start / end switch on and off by step)."""
    __slots__ = ("table",)

    def __init__(self, table: torch.Tensor):
        self.table = table


class Static:
    """Marks a model kwarg that a CUDA graph bakes in, keyed by its value (a captured call is reused only for the
    same value), where the model must read it on the host: e.g. a LoRA scale, which sets module state before the
    forward. Floats left bare reach a captured call of a `tensor_scalars` model as 0-d device tensors instead. The
    model unwraps `.value`."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Static({self.value!r})"


def attention_kwargs(kwargs: dict | None) -> dict | None:
    """A cross_attention_kwargs / joint_attention_kwargs model kwarg with its Static values unwrapped."""
    if kwargs is None:
        return None
    return {k: v.value if isinstance(v, Static) else v for k, v in kwargs.items()}


def tile(value, batch: int, times: int, unwrap: bool = True):
    """Repeat tensors (also inside dicts/lists) whose first dim is the latent batch, for `times` points per call.
    `Shared` values are never repeated; they are unwrapped unless `unwrap` is False."""
    if isinstance(value, Shared):
        return value.value if unwrap else value
    if isinstance(value, dict):
        return {k: tile(v, batch, times, unwrap) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tile(v, batch, times, unwrap) for v in value)
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == batch else value
    return value


class ModelCall:
    """One model call on c trajectory points of a latent batch B: model(x / divisor, t, **kwargs) -> [c, B, ...]."""

    def __init__(self, model, traj, latent: torch.Tensor, model_kwargs: dict | None, graphs=None):
        # a model that cannot be captured (it syncs with the host) says so with `cuda_graphs = False`
        self.model, self.traj = model, traj
        self.graphs = graphs if getattr(model, "cuda_graphs", True) else None
        self.batch, self.shape = latent.shape[0], tuple(latent.shape)
        self.kwargs = model_kwargs or {}
        dev = latent.device
        self.per_step = {k: v.table.to(dev) for k, v in self.kwargs.items() if isinstance(v, PerStep)}
        self.scaled = bool((traj.input_divisor != 1).any())
        # float32 (float64 data: float64) like the scheduler's own divisor: never rounded to the latent's half type
        self.divisor = traj.input_divisor.to(dev, torch.float64 if latent.dtype == torch.float64 else torch.float32)
        self.timesteps = traj.timesteps.to(dev)
        self._t, self._d, self._kw, self._x, self._p = {}, {}, {}, {}, {}

    def _t_rows(self, idx: tuple) -> torch.Tensor:
        if idx not in self._t:  # one timestep per batch row, built once per distinct index tuple
            self._t[idx] = self.timesteps[list(idx)].repeat_interleave(self.batch)
        return self._t[idx]

    def _scaled_input(self, x, idx: tuple) -> torch.Tensor:
        """x / input_divisor per row (Euler's scale_model_input), into a buffer kept for this request."""
        if idx not in self._d:
            self._d[idx] = self.divisor[list(idx)].repeat_interleave(self.batch).view(-1, *[1] * (x.dim() - 1))
        buf = self._x.get(len(idx))
        if buf is None:
            buf = self._x[len(idx)] = torch.empty_like(x)
        return torch.div(x, self._d[idx], out=buf)

    def _kwargs(self, c: int, unwrap: bool = True) -> dict:
        if (c, unwrap) not in self._kw:
            self._kw[c, unwrap] = tile(self.kwargs, self.batch, c, unwrap)
        return self._kw[c, unwrap]

    def _per_step(self, idx: tuple) -> dict:
        """The PerStep kwargs' rows for these points, built once per distinct index tuple."""
        if idx not in self._p:
            self._p[idx] = {k: v[list(idx)].repeat_interleave(self.batch, dim=0) for k, v in self.per_step.items()}
        return self._p[idx]

    def forward(self, x, t, **kwargs) -> torch.Tensor:
        token = _ROWS.set(x.shape[0])
        try:
            return _as_tensor(self.model(x, t, **kwargs))
        finally:
            _ROWS.reset(token)

    def inputs(self, states: torch.Tensor, idx: tuple, unwrap: bool = True) -> tuple:
        """(x_in [c B, ...], timesteps [c B], kwargs) of the points: the input divided by each row's divisor, one
        timestep per row, the kwargs tiled to the rows with the PerStep rows of each point (`Shared` values kept
        wrapped unless `unwrap`)."""
        c = len(idx)
        x = states.reshape(c * self.batch, *self.shape[1:])
        if self.scaled:
            x = self._scaled_input(x, idx)
        t, kw = self._t_rows(idx), self._kwargs(c, unwrap)
        if self.per_step:
            kw = {**kw, **self._per_step(idx)}
        return x, t, kw

    def __call__(self, states: torch.Tensor, idx: tuple, out: torch.Tensor) -> torch.Tensor:
        c = len(idx)
        x, t, kw = self.inputs(states, idx)
        if self.graphs is not None:
            y = self.graphs(self.forward, x, t, kw, getattr(self.model, "tensor_scalars", False))
        else:
            y = self.forward(x, t, **kw)
        if tuple(y.shape) != tuple(x.shape):
            raise ModelOutputError(f"model output shape {tuple(y.shape)} differs from its input {tuple(x.shape)} "
                                   f"(timesteps {self._t_rows(idx).tolist()[:: self.batch]})")
        out.view(c * self.batch, *self.shape[1:]).copy_(y)
        return out


def _is_float(v) -> bool:
    return isinstance(v, float)


def _same_layout(a, b, rows_a: int, rows_b: int, row_scalars: bool) -> bool:
    """Whether model kwargs values a and b (of requests with rows_a and rows_b latent rows) can be one value of a
    call over both requests' rows."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Shared):
        return _same_layout(a.value, b.value, -1, -1, False)
    if isinstance(a, PerStep):
        return a.table.shape[1:] == b.table.shape[1:] and a.table.dtype == b.table.dtype
    if isinstance(a, Static):
        return a.value == b.value
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_layout(a[k], b[k], rows_a, rows_b, row_scalars) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_layout(u, v, rows_a, rows_b, row_scalars) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        if a.dim() and a.shape[0] == rows_a:  # one row per latent row: concatenated
            return (b.dim() > 0 and b.shape[0] == rows_b and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
                    and a.device == b.device)
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if _is_float(a):
        return row_scalars or a == b
    return a == b


def can_share(model, latent_a: torch.Tensor, kwargs_a: dict | None, latent_b: torch.Tensor,
              kwargs_b: dict | None) -> bool:
    """Whether two requests' points can be rows of one model call: the same per-row latent shape, dtype and device,
    and model kwargs of one layout: the same keys; tensors with one row per latent row alike in their other
    dimensions; PerStep tables alike; everything else equal, except floats where the model takes one per row
    (`row_scalars = True`: such a float reaches the model as a [rows] float64 tensor when the requests differ)."""
    if latent_a.shape[1:] != latent_b.shape[1:] or latent_a.dtype != latent_b.dtype or \
            latent_a.device != latent_b.device:
        return False
    return _same_layout(kwargs_a or {}, kwargs_b or {}, latent_a.shape[0], latent_b.shape[0],
                        bool(getattr(model, "row_scalars", False)))


def _concat(values: list, rows: list, device):
    """One kwargs value of a call over several parts' rows: row tensors concatenated, differing floats as one float64
    value per row, anything else (alike in every part, `can_share`) passed once."""
    v = values[0]
    if isinstance(v, Shared):
        return v.value
    if isinstance(v, dict):
        return {k: _concat([u[k] for u in values], rows, device) for k in v}
    if isinstance(v, (list, tuple)):
        return type(v)(_concat([u[i] for u in values], rows, device) for i in range(len(v)))
    if isinstance(v, torch.Tensor) and v.dim() and all(u.shape[0] == n for u, n in zip(values, rows)):
        return torch.cat(values)
    if _is_float(v) and any(u != v for u in values):
        return torch.tensor([u for u, n in zip(values, rows) for _ in range(n)], dtype=torch.float64, device=device)
    return v


def call_parts(parts: list):
    """One model call over the points of several requests: parts are (ModelCall, states [c, B, ...], idx, out
    [c, B, ...]) of one model whose requests `can_share` rows. Each row keeps its own input divisor, timestep and
    kwargs rows; the outputs are written into each part's `out`. A single part is its request's own call (CUDA
    graphs included); several run eagerly; none (a rank with no points this step) calls nothing."""
    if not parts:
        return
    if len(parts) == 1:
        call, states, idx, out = parts[0]
        call(states, idx, out)
        return
    xs, ts, kws, rows = [], [], [], []
    for call, states, idx, _ in parts:
        x, t, kw = call.inputs(states, idx, unwrap=False)
        xs.append(x)
        ts.append(t)
        kws.append(kw)
        rows.append(x.shape[0])
    x = torch.cat(xs)
    y = parts[0][0].forward(x, torch.cat(ts), **_concat(kws, rows, x.device))
    if tuple(y.shape) != tuple(x.shape):
        raise ModelOutputError(f"model output shape {tuple(y.shape)} differs from its input {tuple(x.shape)}")
    lo = 0
    for (call, _, _, out), n in zip(parts, rows):
        out.view(n, *call.shape[1:]).copy_(y[lo: lo + n])
        lo += n


class LocalEvaluator:
    """Single process: all points of a round are one batched model call; no collectives.

    rank / world: this rank's share of a round's points; replicas: the ranks that must hold the same trajectory
    (and draw the same noise); is_root: the rank that decides and reports."""

    rank, world, replicas, is_root = 0, 1, 1, True

    def __init__(self, model):
        self.model = model

    def chunk(self, k: int) -> int:
        """Points per rank for a round of k points (equal chunks so an all-gather can concatenate them)."""
        return k

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (one process: the flag itself)."""
        return bool(flag)

    def call(self, call: ModelCall, states, idx: tuple, out) -> torch.Tensor:
        """Evaluate points on this rank only."""
        return call(states, idx, out)

    def anchor(self, call: ModelCall, states, idx: tuple, out) -> torch.Tensor:
        """Evaluate the anchor, leaving its output on every rank."""
        return call(states, idx, out)

    def send_buffer(self, gathered) -> torch.Tensor:
        """Where this rank writes its chunk of outputs; one process writes straight into `gathered`."""
        return gathered

    def gather(self, gathered, send) -> torch.Tensor:
        """Collect every rank's chunk into `gathered` [world * chunk, B, ...] (nothing to do on one process)."""
        return gathered

    def check_in_step(self, t: torch.Tensor, where: str):
        """Debug check that every rank holds the same bits of `t` (one process: nothing to compare)."""
