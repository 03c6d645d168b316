"""Step-level batching: the runs of many requests advanced together, one model call per rank per step
(docs/design.md section 5).

A `Batch` holds the runs (run.py) of requests whose points can be rows of one model call (`evaluator.can_share`:
the same per-row latent shape and model-kwargs layout). A step, on every rank:

  schedule  every run's pending points come in chunks: chunk r of a round holds the slots draft rank r evaluates in
            the run's solo run. Chunk r of run j goes to rank (r + shift_j) mod world, each shift putting the run's
            first (largest) chunk on the rank with the fewest rows so far, so anchors and small rounds spread.
  execute   this rank's chunks, drafted with the tables of their chunk's rank, as ONE model call over all their
            rows (`evaluator.call_parts`: each row with its own timestep, input divisor and kwargs), then ONE
            all-gather of every rank's rows.
  update    every run copies its chunks' outputs from the gathered rows into its own rows and refines; finished
            runs leave.

Every rank holds the same runs in the same order, so every rank computes the same schedule without a message;
joins and cancellations happen between steps (engine.py decides them on rank 0 and sends them). A run's rows,
weights, noise and model inputs are those of its solo run (`Sampler.run`) on the same ranks, so with a model that
evaluates each row independently of the rows beside it, a request's batched result is its solo result bit for bit
(the fixed-cost model on CPU; tests/test_batch.py). A model whose kernels round differently for another number of
rows differs from its solo result by that rounding: the digits UNet's matrix products on CPU by about 1e-6 per call
(docs/server.md gives the measured bound), and most GPU kernels alike.

`rows(plan, latent_batch, world)` is the most latent rows a run puts on one rank in one call; the engine admits
runs while their sum stays within the batch's `max_rows` (an empty batch takes any request), and `degree` gives
the n a request runs with when only some rows are free.
"""
import torch

from .arena import chunk
from .evaluator import can_share, call_parts
from .options import SamplingOptions
from .plan import Plan
from .results import NonFiniteOutputError
from .run import Run, device_scope


def rows(plan: Plan, latent_batch: int, world: int) -> int:
    """The most latent rows a run of `plan` puts on one rank in one model call: its widest chunk (an anchor is a
    chunk of one point) times its latent batch."""
    return max([chunk(len(r.drafts), world) for r in plan.rounds] + [1]) * latent_batch


def degree(options: SamplingOptions, steps: int, latent_batch: int, world: int, room: int) -> int | None:
    """The n a request runs with when `room` rows per rank are free: its own n when its rows fit, else the largest
    smaller n whose rows fit (never below 1: the plan stays the pure function of (mode, S, n)); None when not even
    n = 1 fits."""
    for n in range(options.n(world), 0, -1):  # at most --max-parallel plans, each O(steps)
        if rows(options.plan(steps, n), latent_batch, world) <= room:
            return n
    return None


class Batch:
    """The runs in flight on this rank, in join order, and the buffers of their shared model calls."""

    def __init__(self, ev, model, max_rows: int):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        self.ev, self.model, self.max_rows = ev, model, max_rows
        self.runs, self.reserved = {}, {}  # key -> Run, key -> its rows (`rows`)
        self._gathered = {}  # (row shape, dtype, device) -> the all-gather's rows, grown as needed

    def __len__(self) -> int:
        return len(self.runs)

    def __contains__(self, key) -> bool:
        return key in self.runs

    @property
    def room(self) -> int:
        """Rows per rank still free under max_rows."""
        return self.max_rows - sum(self.reserved.values())

    def can_join(self, latents: torch.Tensor, model_kwargs) -> bool:
        """Whether a request with these latents and model kwargs can share the batch's model calls."""
        if not self.runs:
            return True
        first = next(iter(self.runs.values()))
        return can_share(self.model, first.latent, first.call.kwargs, latents, model_kwargs)

    def add(self, key, run: Run, rows_per_rank: int):
        self.runs[key] = run
        self.reserved[key] = rows_per_rank

    def drop(self, key):
        """Remove a run (cancelled, failed or finished) and give its arena back."""
        self.reserved.pop(key)
        self.runs.pop(key).close()

    def _buffer(self, n: int, run: Run) -> torch.Tensor:
        like = run.latent
        key = (tuple(like.shape[1:]), like.dtype, like.device)
        buf = self._gathered.get(key)
        if buf is None or buf.shape[0] < n:
            buf = self._gathered[key] = torch.empty(n, *like.shape[1:], dtype=like.dtype, device=like.device)
        return buf[:n]

    @torch.no_grad()  # sampling never needs gradients
    def step(self) -> list:
        """One model call per rank for every run's pending points; returns [(key, SampleOutput or the exception it
        failed with)] of the runs that left (finished, non-finite outputs, or every run when the model call
        raised a ValueError, e.g. a ModelOutputError)."""
        ev, world = self.ev, self.ev.world
        first = next(iter(self.runs.values()))
        with device_scope(first.latent.device):
            loads, order, width = [0] * world, [], 0
            for key, run in self.runs.items():
                p = run.pending
                shift = min(range(world), key=loads.__getitem__)
                for r in range(world):
                    loads[(r + shift) % world] += p.size(r) * run.batch
                order.append((key, run, p, shift, width))
                width += p.chunk * run.batch
            gathered = self._buffer(world * width, first)
            send = ev.send_buffer(gathered)
            parts = []
            for key, run, p, shift, lo in order:
                run.stats.batch_requests = max(run.stats.batch_requests, len(order))
                states, idx = run.states((ev.rank - shift) % world)
                if idx:
                    parts.append((run.call, states, idx,
                                  send[lo: lo + len(idx) * run.batch].view(len(idx), *run.shape)))
            for run in self.runs.values():
                run.clock.start("model")
            try:
                call_parts(parts)
            except ValueError as e:  # the model failed on this call: every run in it fails
                failed = [(key, e) for key in self.runs]
                for key, _ in failed:
                    self.drop(key)
                return failed
            for run in self.runs.values():
                run.clock.start("comm")
            ev.gather(gathered, send)
            done = []
            for key, run, p, shift, lo in order:
                out = run.outputs()
                for r in range(world):
                    n = p.size(r)
                    if n:
                        src = ((r + shift) % world) * width + lo
                        out[r * p.chunk: r * p.chunk + n].view(n * run.batch, *run.shape[1:]).copy_(
                            gathered[src: src + n * run.batch])
                run.update()
                if run.done:
                    done.append(key)
            finished = []
            for key in done:
                try:
                    finished.append((key, self.runs[key].finish()))
                except NonFiniteOutputError as e:
                    finished.append((key, e))
                self.drop(key)
            return finished
