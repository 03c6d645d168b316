"""One request's sampling as a state object, advanced one model call at a time (docs/design.md section 3).

A `Run` holds what a draft-and-refine request needs between model calls: its trajectory and plan, the round tables
of every draft rank, its arena, its model call, the replica generator, the blend and its stats. Per round at anchor
i, advancing m steps:

  [evaluate o_i] -> draw the round's noise (replica generators, the scheduler's order) -> draft a rank's slots in
  one fused pass -> model -> gather every rank's outputs -> refine x_{i+m} and the scheduler's registers in one pass.

`pending` says what the next model call evaluates: the anchor (one point), or the round's k drafts in chunks of c
slots, chunk r drafted by the tables of draft rank r. `states(r)` drafts chunk r (the noise was drawn once for the
round) and returns its points; `outputs()` is where the outputs of every chunk land, in slot order; `update()`
consumes them: the refine, then the next call (rounds that call no model, e.g. a final aggressive round, run there
too). `finish()` checks the non-finite flags and returns the `SampleOutput`; `close()` gives the arena back.

The sampler drives one run per request (`Sampler.run`); a batch (batch.py) drives many with one model call.
"""
import contextlib
import os
import time
from dataclasses import dataclass

import torch

from . import kernels
from .arena import Arena, ArenaPool, Rows
from .evaluator import ModelCall
from .noise import draw_noise, replica_generator
from .plan import Plan
from .results import Clock, NonFiniteOutputError, SampleOutput, SampleStats
from .trajectory import Trajectory

# Every rank refines the same rows with the same weights and noise, so ranks hold the same anchor bit for bit by
# construction. DRIFFUSION_CHECK_SYNC=k checks that every k rounds (one all-gather of a checksum), for debugging.
CHECK_SYNC = int(os.environ.get("DRIFFUSION_CHECK_SYNC", "0") or 0)

ANCHOR, DRAFTS, DONE = "anchor", "drafts", "done"


@dataclass(frozen=True)
class Points:
    """A run's next model call: `k` trajectory points in chunks of `chunk` slots (chunk r: slots [r c, (r+1) c))."""
    kind: str    # ANCHOR (one point, the anchor block's x) or DRAFTS
    k: int
    chunk: int

    def size(self, r: int) -> int:
        """Points of chunk r."""
        return max(0, min(self.chunk, self.k - r * self.chunk))


def device_scope(device: torch.device):
    """Kernels, graph capture and events use the current CUDA device: make it the latent's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def draw_round(arena: Arena, lay: Rows, traj: Trajectory, draws: range, gen):
    """The round's noise draws into the noise rows, in the scheduler's order (every rank draws the same)."""
    if not draws:
        return
    rows = arena.rows
    staged = rows.is_cuda and (gen is None or gen.device.type == "cpu")
    stages = {}
    for s, q in enumerate(draws):
        dtype = traj.draw_dtypes[q] or rows.dtype
        host = None
        if staged and gen is not None:
            if dtype not in stages:
                stages[dtype] = (arena.stage(dtype), arena.stage(dtype).take())
            host = stages[dtype][1][s]
        draw_noise(rows[lay.noise + s], gen, dtype, host)
    for stage, _ in stages.values():
        stage.queued()


def _flag(outputs, flags, offset):
    """Per-output sums into preallocated flags: non-finite iff an output has NaN/inf. No host sync here."""
    torch.sum(outputs.reshape(len(outputs), -1), dim=1, dtype=torch.float32, out=flags[offset: offset + len(outputs)])


def _check(plan: Plan, traj: Trajectory, flags):
    bad = (~torch.isfinite(flags[: plan.model_evals])).nonzero()
    if len(bad):
        e = int(bad[0])
        for r, rnd in enumerate(plan.rounds):
            points = ([rnd.anchor] if rnd.eval_anchor else []) + list(rnd.drafts)
            if e < len(points):
                j = points[e]
                raise NonFiniteOutputError(
                    f"non-finite model output in round {r} at timestep {traj.timesteps[j].item():g} "
                    f"(trajectory index {j} of {traj.steps})")
            e -= len(points)


class Run:
    """The state of one request's draft-and-refine sampling on this rank (every rank holds the same)."""

    def __init__(self, ev, model, plan: Plan, traj: Trajectory, x, lay: Rows, tables: list, pool: ArenaPool,
                 generator=None, model_kwargs=None, blend=None, graphs=None):
        self.ev, self.plan, self.traj, self.lay, self.tables, self.blend = ev, plan, traj, lay, tables, blend
        self.pool = pool
        self.arena = pool.take(x, lay, plan.model_evals)
        self.rows = self.arena.rows
        self.call = ModelCall(model, traj, x, model_kwargs, graphs)
        self.latent, self.batch, self.shape = x, x.shape[0], tuple(x.shape)  # latent rows per point, its shape
        self.gen = replica_generator(ev, generator, x.device) if traj.draws else None
        self.stats = SampleStats(plan.mode, plan.steps, plan.parallel, ideal_speedup=plan.ideal_speedup)
        self.clock, self.t0 = Clock(x.device), time.perf_counter()
        self.r, self.phase = 0, None
        torch.mul(x, traj.init_noise_sigma, out=self.rows[lay.block(0)])
        self._enter()

    @property
    def done(self) -> bool:
        return self.phase == DONE

    @property
    def pending(self) -> Points | None:
        """The next model call (None once every round ran)."""
        if self.phase == ANCHOR:
            return Points(ANCHOR, 1, 1)
        if self.phase == DRAFTS:
            return Points(DRAFTS, len(self.plan.rounds[self.r].drafts), self.tables[0][self.r].chunk)
        return None

    def _enter(self):
        """Start round r: stop at its first model call; a round without one is refined at once."""
        while self.r < len(self.plan.rounds):
            self.clock.round(self.r)
            rnd = self.plan.rounds[self.r]
            if rnd.eval_anchor:
                self.phase = ANCHOR
                return
            self._draw()
            if rnd.drafts:
                self.phase = DRAFTS
                return
            self._refine()
        self.phase = DONE
        self.clock.round(None)

    def _draw(self):
        self.clock.start("draft")
        draw_round(self.arena, self.lay, self.traj, self.tables[0][self.r].noise, self.gen)

    def states(self, chunk: int) -> tuple:
        """(states [n, B, ...], their trajectory indices) of chunk `chunk` of the pending call; drafts are drafted
        here with the tables of draft rank `chunk` (and blended)."""
        rnd, lay = self.plan.rounds[self.r], self.lay
        if self.phase == ANCHOR:
            cur = lay.block(self.tables[0][self.r].block)
            return (self.rows[cur: cur + 1], (rnd.anchor,)) if chunk == 0 else (self.rows[cur: cur], ())
        tab = self.tables[chunk][self.r]
        self.clock.start("draft")
        if tab.draft is not None:
            kernels.combine(self.rows, tab.draft.out, tab.draft.inp, tab.draft.coef)
            if self.blend is not None:
                self.blend(self.rows[lay.drafts: lay.drafts + len(tab.own)], tab.own)
        return self.rows[lay.drafts: lay.drafts + len(tab.own)], tab.own

    def outputs(self) -> torch.Tensor:
        """Where the pending call's outputs go, in slot order: the anchor's output row, or the gathered rows
        (world x chunk; slot s holds the output at draft anchor + 1 + s)."""
        tab, lay = self.tables[0][self.r], self.lay
        if self.phase == ANCHOR:
            cur = lay.block(tab.block)
            return self.rows[cur + 1: cur + 2]
        return self.rows[lay.gathered: lay.gathered + len(self.tables) * tab.chunk]

    def update(self):
        """Consume the pending call's outputs (every slot written): flag and count them, then draft or refine."""
        rnd, tab = self.plan.rounds[self.r], self.tables[0][self.r]
        anchor = self.phase == ANCHOR
        k = 1 if anchor else len(rnd.drafts)
        _flag(self.outputs()[:k], self.arena.flags, tab.eval_offset + (0 if anchor else int(rnd.eval_anchor)))
        self.stats.serial_rounds += 1
        self.stats.model_evals += k
        self.stats.batch_widths.append(k)
        if anchor:
            self._draw()
            if rnd.drafts:
                self.phase = DRAFTS
                return
        self._refine()
        self._enter()

    def _refine(self):
        rnd, tab, lay = self.plan.rounds[self.r], self.tables[0][self.r], self.lay
        self.clock.start("refine")
        kernels.combine(self.rows, tab.refine.out, tab.refine.inp, tab.refine.coef)
        nxt = lay.block(1 - tab.block)
        if self.blend is not None:
            self.blend(self.rows[nxt: nxt + 1], (rnd.anchor + rnd.advance,))
        if CHECK_SYNC and (self.r + 1) % CHECK_SYNC == 0:
            self.ev.check_in_step(self.rows[nxt], f"after round {self.r} (anchor {rnd.anchor + rnd.advance})")
        self.r += 1

    def finish(self) -> SampleOutput:
        """The result of a finished run (NonFiniteOutputError if a model output was not finite)."""
        result = self.rows[self.lay.block(len(self.plan.rounds) % 2)]
        self.clock.start("check")
        _check(self.plan, self.traj, self.arena.flags)
        if self.arena.result is not None:
            self.arena.result.copy_(result, non_blocking=True)
        self.stats.phases = self.clock.stop()
        self.stats.wall_time = time.perf_counter() - self.t0
        return SampleOutput(result.clone(), self.stats, self.plan, self.arena.result)

    def close(self):
        """Give the arena back (once)."""
        if self.arena is not None:
            self.pool.give(self.arena)
            self.arena = self.rows = None
