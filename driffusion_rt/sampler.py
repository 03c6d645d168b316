"""The draft-and-refine sampler: executes a plan against an evaluator (docs/design.md sections 1-3).

Per round at anchor i, advancing m steps, on every rank:
  [evaluate o_i] -> draw the round's noise (replica generators, the scheduler's order) -> draft this rank's slots
  in one fused pass -> model -> all-gather the outputs -> refine x_{i+m} and the scheduler's registers in one pass.
Every rank refines from the same gathered outputs with the same noise, so every rank holds the same anchor bit for
bit and one collective per round suffices (the all-gather; conservative anchors on CPU ranks add a broadcast).

All rows of a request live in one buffer, the arena [rows, B, ...]: two anchor blocks used in turn (x, o, prev,
registers; a round reads one and writes the other), the round's noise draws, this rank's drafts and the gathered
outputs (`Rows` numbers them). Drafts and refines are `kernels.combine` calls with row numbers and weights
precomputed once per (trajectory, plan, draft rule, rank) from rounds.py; nothing is allocated per round.

A `Sampler` takes a request either as keyword options (`sampler(scheduler, x, steps=..., mode=...)`, what `sample`
does) or prepared (`sampler.apply(prepared, options)`: a `Prepared` trajectory, latents, model kwargs, generator and
blend, with one `SamplingOptions`), which is how every entry point of the runtime applies a request.
"""
import contextlib
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import adaptive, kernels, parasolver
from .cuda_graphs import GraphCache
from .distributed import default_evaluator
from .evaluator import LocalEvaluator, ModelCall
from .noise import PinnedStage, draw_noise, replica_generator
from .options import SamplingOptions
from .plan import MODES, Plan
from .results import Cancelled, Clock, NonFiniteOutputError, SampleOutput, SampleStats
from .rounds import round_weights
from .trajectory import Trajectory

# Stochastic schedulers keep the sequential sample's spread (within 5%) from this many model calls per parallel
# evaluation on; below it their noise amplifies draft errors (perf/bench_spread.py, perf/results/spread.md).
STOCHASTIC_CALLS_PER_N = 8
# Every rank refines the same rows with the same weights and noise, so ranks hold the same anchor bit for bit by
# construction. DRIFFUSION_CHECK_SYNC=k checks that every k rounds (one all-gather of a checksum), for debugging.
CHECK_SYNC = int(os.environ.get("DRIFFUSION_CHECK_SYNC", "0") or 0)

__all__ = ["Sampler", "sample", "Prepared", "Cancelled", "STOCHASTIC_CALLS_PER_N"]


@dataclass(frozen=True)
class Prepared:
    """A request prepared for the sampler on this rank: the scheduler's trajectory, the latents the run starts from
    (unit noise [B, ...]; img2img: the noised state at the trajectory's start), the model kwargs, the generator of
    the stochastic steps' noise (rank 0's counts) and the per-state blend (inpainting) or None."""
    trajectory: Trajectory
    latents: torch.Tensor
    model_kwargs: dict | None = None
    generator: torch.Generator | None = None
    blend: object = None

    @property
    def steps(self) -> int:
        """The step count the schedule was set with (img2img runs the steps from the trajectory's start)."""
        return self.trajectory.num_inference_steps


class LRU(OrderedDict):
    """A small least-recently-used cache: a long-lived server sees many shapes and step counts."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass(frozen=True)
class Rows:
    """Row numbers of the arena for a plan: block b's x, o, prev and registers; noise; drafts; gathered outputs."""
    registers: int
    noise: int        # first noise row
    drafts: int       # first row of this rank's drafts
    gathered: int     # first row of the gathered outputs (world * chunk rows)
    rows: int         # total

    def block(self, b: int) -> int:
        return b * (3 + self.registers)

    @classmethod
    def make(cls, registers, noise_rows, chunk, world):
        noise = 2 * (3 + registers)
        drafts = noise + noise_rows
        gathered = drafts + chunk
        return cls(registers, noise, drafts, gathered, gathered + world * chunk)


@dataclass(frozen=True)
class Table:
    """One combine call: rows written, rows read, weights [written, read] (on the device)."""
    out: torch.Tensor
    inp: torch.Tensor
    coef: torch.Tensor


@dataclass(frozen=True)
class RoundTable:
    draft: Table | None     # this rank's drafts (None: no own draft this round)
    refine: Table
    own: tuple              # this rank's draft indices
    chunk: int              # draft slots per rank this round
    noise: range            # the scheduler's draws this round
    block: int              # the anchor block read (0 or 1); the refine writes the other
    eval_offset: int        # index of the round's first model evaluation (for error reports)


def _row(name, lay: Rows, block: int, anchor: int) -> int:
    base = lay.block(block)
    if name == "x":
        return base
    if name == "o":
        return base + 1
    if name == "prev":
        return base + 2
    kind, k = name
    if kind == "h":
        return base + 3 + k
    if kind == "z":
        return lay.noise + k
    return lay.gathered + (k - anchor - 1)  # ("d", j): slot s holds draft anchor + 1 + s


def _table(terms: list, lay, block, anchor, out_rows, device, acc) -> Table:
    names = sorted({k for t in terms for k in t}, key=repr)
    coef = torch.tensor([[t.get(n, 0.0) for n in names] for t in terms], dtype=torch.float64)
    rows = [_row(n, lay, block, anchor) for n in names]
    return Table(torch.tensor(out_rows, dtype=torch.long, device=device),
                 torch.tensor(rows, dtype=torch.long, device=device), coef.to(device, acc))


def round_tables(traj: Trajectory, plan: Plan, rule: str, ev, device, acc) -> tuple:
    """(Rows, [RoundTable]) of `plan` on this rank: rows and weights of every draft and refine."""
    weights = round_weights(traj, plan, rule)
    chunk = max([ev.chunk(len(r.drafts)) for r in plan.rounds if r.drafts] + [0])
    lay = Rows.make(max(traj.registers(r.anchor + r.advance) for r in plan.rounds) if plan.rounds else 0,
                      max(len(w.noise) for w in weights), chunk, ev.world)
    tables, offset = [], 0
    for r, (rnd, w) in enumerate(zip(plan.rounds, weights)):
        b, k = r % 2, len(rnd.drafts)
        c = ev.chunk(k) if k else 0
        lo = ev.rank * c
        own = rnd.drafts[lo: lo + c]
        draft = None
        if own:
            draft = _table(list(w.drafts[lo: lo + len(own)]), lay, b, rnd.anchor,
                           list(range(lay.drafts, lay.drafts + len(own))), device, acc)
        outs = list(w.refine)
        refine = _table([w.refine[o] for o in outs], lay, b, rnd.anchor, [_row(o, lay, 1 - b, 0) for o in outs],
                        device, acc)
        tables.append(RoundTable(draft, refine, own, c, w.noise, b, offset))
        offset += rnd.evals
    return lay, tables


class Arena:
    """The rows of a request [rows, B, ...] on the latent's device, with page-locked noise staging and result
    rows for CUDA latents; allocated once per (shape, dtype, device) and grown when a plan needs more."""

    def __init__(self, latent: torch.Tensor, rows: int, evals: int, noise_rows: int):
        kw = dict(device=latent.device, dtype=latent.dtype)
        self.rows = torch.empty(rows, *latent.shape, **kw)
        self.flags = torch.empty(max(evals, 1), device=latent.device, dtype=torch.float32)
        self.stages, self.noise_rows, self.result = {}, noise_rows, None
        if latent.is_cuda:
            self.result = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)

    def fits(self, rows, evals, noise_rows) -> bool:
        return self.rows.shape[0] >= rows and self.flags.shape[0] >= evals and self.noise_rows >= noise_rows

    def stage(self, dtype) -> PinnedStage:
        if dtype not in self.stages:
            self.stages[dtype] = PinnedStage(max(self.noise_rows, 1), self.rows.shape[1:], dtype)
        return self.stages[dtype]


def _device_scope(device: torch.device):
    """Kernels, graph capture and events use the current CUDA device: make it the latent's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Sampler:
    """A persistent draft-and-refine executor for one model. Buffers, round tables and CUDA graphs live across
    requests."""

    def __init__(self, model, evaluator=None, cuda_graphs: bool = True, layout=None):
        self.model = model
        self.ev = evaluator if evaluator is not None else LocalEvaluator(model)
        self.cuda_graphs = cuda_graphs  # used on CUDA latents only
        self.layout = layout  # the parallel layout layout.parallelize built this sampler on (None: not built there)
        self._graphs = GraphCache()
        self._arenas, self._tables = LRU(8), LRU(64)

    def arena(self, x, lay: Rows, plan: Plan) -> Arena:
        key = (tuple(x.shape), x.dtype, x.device)
        a = self._arenas.get(key)
        noise_rows = lay.drafts - lay.noise
        if a is None or not a.fits(lay.rows, plan.model_evals, noise_rows):
            a = self._arenas[key] = Arena(x, lay.rows, plan.model_evals, noise_rows)
        return a

    def tables(self, traj, plan, rule, x) -> tuple:
        acc = kernels.fallback.accum_dtype(x.dtype)
        key = (traj.key, plan, rule, x.device, acc)
        if key not in self._tables:
            self._tables[key] = round_tables(traj, plan, rule, self.ev, x.device, acc)
        return self._tables[key]

    def __call__(self, scheduler, x, *, steps, mode="aggressive", parallel=None, generator=None,
                 model_kwargs=None, timesteps_kwargs=None, progress=False, drafts="jump", start=0, blend=None,
                 subintervals=None, preconditioning=None, window=None, tolerance=None, cancel=None,
                 **step_kwargs) -> SampleOutput:
        """Sample from `x` with `scheduler` (a diffusers scheduler or a Trajectory) and the options as keywords
        (see `sample`)."""
        options = SamplingOptions(mode, parallel, drafts, subintervals, preconditioning, window, tolerance)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point latent tensor [B, ...], got {type(x).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be one torch.Generator, got {type(generator).__name__}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        traj = scheduler if isinstance(scheduler, Trajectory) else \
            Trajectory.from_scheduler(scheduler, steps, timesteps_kwargs, start, **step_kwargs)
        if isinstance(scheduler, Trajectory) and (traj.num_inference_steps != steps or traj.start != start):
            raise ValueError(f"the trajectory was built for steps={traj.num_inference_steps}, start={traj.start}; "
                             f"got steps={steps}, start={start}")
        return self._sample(traj, x, options, generator, model_kwargs, progress, blend, cancel)

    def apply(self, prepared: Prepared, options: SamplingOptions, *, progress=False, cancel=None) -> SampleOutput:
        """Sample a prepared request with one set of options: how every entry point of the runtime (command line,
        engine, pipelines) runs a request. Every rank calls this with the same request and options."""
        return self._sample(prepared.trajectory, prepared.latents, options, prepared.generator,
                            prepared.model_kwargs, progress, prepared.blend, cancel)

    def _sample(self, traj, x, options, generator, model_kwargs, progress, blend, cancel) -> SampleOutput:
        parallel = options.n(self.ev.world)
        if not options.planned and blend is not None:
            raise ValueError(f"a blend (inpainting with a 4-channel denoiser) runs in modes {', '.join(MODES)}, not "
                             f"mode={options.mode!r}")
        drift = options.drift_warning(traj, parallel)
        if drift and self.ev.is_root:
            warnings.warn(drift, stacklevel=3)
        if options.mode in ("aggressive", "conservative") and parallel > 1 and traj.draws and self.ev.is_root:
            _warn_spread(traj, parallel)
        with _device_scope(x.device):
            if options.adaptive:
                return adaptive.run(self.ev, self.model, traj, x, parallel, options.resolved_tolerance(), generator,
                                    model_kwargs, cancel, self._graphs if self.cuda_graphs and x.is_cuda else None,
                                    self._tables)
            if options.iterative:
                cfg = options.iterative_config(traj.steps, parallel)
                return parasolver.run(self.ev, self.model, traj, x, options.mode, parallel, cfg, generator,
                                      model_kwargs, cancel=cancel)
            return self.run(options.plan(traj.steps, parallel), traj, x, generator, model_kwargs, progress,
                            options.drafts, blend, cancel=cancel)

    @torch.no_grad()  # sampling never needs gradients: no autograd graph per model call, whatever the model
    def run(self, plan: Plan, traj: Trajectory, x, generator=None, model_kwargs=None, progress=False,
            drafts="jump", blend=None, cancel=None) -> SampleOutput:
        """Execute `plan`; every rank calls this with the same plan, trajectory and latent shape.

        blend: None, or `blend(states, idx)` applied in place to every state a combine produces (this rank's
        drafts and each refined anchor) with their trajectory indices; elementwise and the same on every rank
        (inpainting: x_j <- m x_j + (1 - m) noised(init, j), see driffusion_rt/blend.py).
        cancel: an object with is_set(), given on every rank or on none (rank 0's counts); it stops every rank at
        a round boundary (Cancelled)."""
        ev = self.ev
        lay, tables = self.tables(traj, plan, drafts, x)
        arena = self.arena(x, lay, plan)
        rows = arena.rows
        graphs = self._graphs if self.cuda_graphs and x.is_cuda else None
        call = ModelCall(self.model, traj, x, model_kwargs, graphs)
        gen = replica_generator(ev, generator, x.device) if traj.draws else None
        stats = SampleStats(plan.mode, plan.steps, plan.parallel, ideal_speedup=plan.ideal_speedup)
        clock, t0 = Clock(x.device), time.perf_counter()
        bar = tqdm(total=len(plan.rounds), desc=f"{plan.mode} n={plan.parallel}", unit="round", leave=False,
                   disable=None) if progress and ev.is_root else None  # disable=None: only on a terminal
        torch.mul(x, traj.init_noise_sigma, out=rows[lay.block(0)])
        for r, (rnd, tab) in enumerate(zip(plan.rounds, tables)):
            if cancel is not None and ev.agree(cancel.is_set()):
                raise Cancelled(f"cancelled before round {r} of {len(plan.rounds)}")
            i, k, cur = rnd.anchor, len(rnd.drafts), lay.block(tab.block)
            clock.round(r)
            if rnd.eval_anchor:
                clock.start("model")
                ev.anchor(call, rows[cur: cur + 1], (i,), rows[cur + 1: cur + 2])  # every rank ends with o_i
                self._flag(rows[cur + 1: cur + 2], arena.flags, tab.eval_offset)
                stats.serial_rounds += 1
                stats.model_evals += 1
                stats.batch_widths.append(1)
            clock.start("draft")
            self._draw(arena, lay, traj, tab.noise, gen)
            if k:
                if tab.draft is not None:
                    kernels.combine(rows, tab.draft.out, tab.draft.inp, tab.draft.coef)
                    if blend is not None:
                        blend(rows[lay.drafts: lay.drafts + len(tab.own)], tab.own)
                gathered = rows[lay.gathered: lay.gathered + ev.world * tab.chunk]
                send = ev.send_buffer(gathered)
                clock.start("model")
                if tab.own:
                    ev.call(call, rows[lay.drafts: lay.drafts + len(tab.own)], tab.own, send[: len(tab.own)])
                clock.start("comm")
                ev.gather(gathered, send)
                self._flag(gathered[:k], arena.flags, tab.eval_offset + int(rnd.eval_anchor))
                stats.serial_rounds += 1
                stats.model_evals += k
                stats.batch_widths.append(k)
            clock.start("refine")
            kernels.combine(rows, tab.refine.out, tab.refine.inp, tab.refine.coef)
            if blend is not None:
                nxt = lay.block(1 - tab.block)
                blend(rows[nxt: nxt + 1], (i + rnd.advance,))
            if CHECK_SYNC and (r + 1) % CHECK_SYNC == 0:
                ev.check_in_step(rows[lay.block(1 - tab.block)], f"after round {r} (anchor {i + rnd.advance})")
            if bar is not None:
                bar.update()
        clock.round(None)
        if bar is not None:
            bar.close()
        result = rows[lay.block(len(plan.rounds) % 2)]
        clock.start("check")
        self._check(plan, traj, arena.flags)
        if arena.result is not None:
            arena.result.copy_(result, non_blocking=True)
        stats.phases = clock.stop()
        stats.wall_time = time.perf_counter() - t0
        return SampleOutput(result.clone(), stats, plan, arena.result)

    @staticmethod
    def _draw(arena: Arena, lay: Rows, traj: Trajectory, draws: range, gen):
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

    @staticmethod
    def _flag(outputs, flags, offset):
        """Per-output sums into preallocated flags: non-finite iff an output has NaN/inf. No host sync here."""
        torch.sum(outputs.reshape(len(outputs), -1), dim=1, dtype=torch.float32, out=flags[offset: offset + len(outputs)])

    @staticmethod
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


def _warn_spread(traj: Trajectory, parallel: int):
    """A stochastic scheduler with too few model calls per parallel evaluation: say so, and what would be safe."""
    if traj.steps >= STOCHASTIC_CALLS_PER_N * parallel:
        return
    safe_n = traj.steps // STOCHASTIC_CALLS_PER_N
    warnings.warn(
        f"{traj.scheduler_name} draws noise during sampling; with {traj.steps} model calls and parallel={parallel} "
        f"({traj.steps / parallel:.1f} per parallel evaluation, below {STOCHASTIC_CALLS_PER_N}) the parallel modes "
        f"amplify draft errors and the sample's spread grows: use parallel <= {max(safe_n, 1)}"
        + ("" if safe_n >= 2 else " (i.e. sequential)") + f", or >= {STOCHASTIC_CALLS_PER_N * parallel} model calls "
        f"(perf/results/spread.md)", stacklevel=4)


def sample(model, scheduler, x, *, steps, mode="aggressive", parallel=None, generator=None, model_kwargs=None,
           timesteps_kwargs=None, progress=False, drafts="jump", start=0, blend=None, subintervals=None,
           preconditioning=None, window=None, tolerance=None, **step_kwargs) -> SampleOutput:
    """Sample with draft-and-refine parallelism. Returns `.sample` (the final latent) and `.stats`.

    model(x_in, t, **model_kwargs) sees what a diffusers loop gives it: x_in = scale_model_input(x, t), one
    timestep per batch row. scheduler: any diffusers scheduler whose step is affine (probed, see trajectory.py).
    x is unit-variance noise [B, ...] (init_noise_sigma is applied here), or with start=k > 0 the noised state at
    timestep index k (img2img: what scheduler.add_noise gives; the run covers timesteps[k:]; see
    driffusion_rt.strength for diffusers' `strength` convention). blend: an elementwise map applied to every state
    the run produces (inpainting, driffusion_rt.blend.MaskBlend; not in picard / parasolver). mode is sequential,
    aggressive or conservative; parallel (n) defaults to the world size (1 outside torchrun). step_kwargs are the
    scheduler's step options (e.g. eta for DDIM); timesteps_kwargs go to set_timesteps (e.g. mu for Flux).
    drafts="jump" drafts with the scheduler's chain at the anchor's output (the paper's jumps); "extrapolate"
    extrapolates the output from the anchor's and the previous one (same model calls, closer drafts). progress
    shows a tqdm bar of rounds on rank 0. Under torchrun every rank calls this with the same arguments (the
    generator matters on rank 0 only) and every rank receives the result. For many requests on one model, keep
    a `Sampler` instead: its buffers and CUDA graphs persist.

    mode="parasolver" (and "picard", its subintervals = steps case) iterate to a tolerance instead of following
    a fixed plan: subintervals N (default steps // 2), preconditioning M (default 2; picard 0), window p (default
    parallel), tolerance delta (default 0.05; 0 reproduces the sequential sampler). See driffusion_rt/parasolver.py.
    """
    return Sampler(model, default_evaluator(model))(
        scheduler, x, steps=steps, mode=mode, parallel=parallel, generator=generator, model_kwargs=model_kwargs,
        timesteps_kwargs=timesteps_kwargs, progress=progress, drafts=drafts, start=start, blend=blend,
        subintervals=subintervals, preconditioning=preconditioning, window=window, tolerance=tolerance, **step_kwargs)
