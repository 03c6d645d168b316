"""The draft-and-refine sampler: executes a plan against an evaluator (DESIGN.md sections 1-3).

Per round at anchor i, advancing m steps:
  broadcast x_i from rank 0 -> [evaluate o_i] -> draw the round's refine noise (rank 0, sequential order)
  -> each rank drafts its slots with one fused pass -> model -> all-gather -> rank 0 refines x_{i+m} in one pass.
Rank 0 is the one authority on the trajectory (its anchor is broadcast each round), so ranks cannot drift apart.

One buffer `rows` [2 + slots, B, ...] holds the round: row 0 = x_i, row 1 = o_i, rows 2.. = draft outputs
in slot order (slot s is draft i+1+s). So the refine is one weighted sum over rows 0..m, written back into
row 0, and the aggressive carry is row 2 + (m - 1). The draft of x_{i+1} is step(i) itself, its noise
included, so it is exact: with n = 1 every mode reproduces the sequential sampler, stochastic ones too.
"""
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import kernels
from .cuda_graphs import GraphCache
from .distributed import default_evaluator
from .evaluator import LocalEvaluator, ModelCall, ModelOutputError
from .plan import MODES, Plan, make_plan
from .trajectory import Trajectory


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


DRAFT_RULES = ("jump", "extrapolate")


@dataclass(frozen=True)
class _RoundWork:
    """Everything a round needs, precomputed once per (trajectory, plan, draft rule, world) on the device."""
    draft_coef: torch.Tensor   # [own slots, len(inputs)] for this rank's drafts
    inputs: tuple              # which of x (x_i), o (o_i), z (z_i), prev (o_{i-1}) this rank's drafts read
    refine_w: torch.Tensor     # [m + 1] over rows 0..m
    noise_w: torch.Tensor      # [q] over the round's noise draws
    chunk: int                 # slots per rank
    own: tuple                 # this rank's draft indices (slots rank*chunk ..)
    eval_offset: int           # index of this round's first model evaluation (for error reports)


def _previous_output(plan: Plan, r: int) -> int:
    """The index of the output that extrapolated drafts pair with round r's anchor output.

    Outputs of equal quality extrapolate well: aggressive anchors carry a draft output, so they pair with the
    previous draft's (index i - 1); conservative anchors are evaluated on refined states, so they pair with the
    previous anchor's. (Measured: pairing a conservative anchor with a draft output amplifies that draft's error.)"""
    return plan.rounds[r].anchor - 1 if plan.mode == "aggressive" else plan.rounds[r - 1].anchor


def _round_work(traj: Trajectory, plan: Plan, rule: str, ev, device, acc) -> list:
    works, offset = [], 0
    for r, rnd in enumerate(plan.rounds):
        i, m, k = rnd.anchor, rnd.advance, len(rnd.drafts)
        c = ev.chunk(k) if k else 0
        lo = ev.rank * c
        own = rnd.drafts[lo: lo + c] if k else ()
        coef = torch.zeros(k, 4, dtype=torch.float64)  # over (x_i, o_i, z_i, o_{i-1})
        if k:
            if rule == "extrapolate" and r > 0:  # round 0 holds a single output: plain jumps
                e = traj.extrapolated(i, _previous_output(plan, r), rnd.drafts)
                coef[:, :2], coef[:, 3] = e[:, :2], e[:, 2]
            else:
                coef[:, :2] = traj.jumps(i, rnd.drafts)
            coef[0, 2] = traj.C[i]  # draft i+1 is exactly step(i), its noise included
        mine = coef[lo: lo + len(own)]
        names = ("x", "o", "z", "prev")
        cols = [q for q in range(4) if q < 2 or (len(own) and bool(mine[:, q].ne(0).any()))]
        w, nw = traj.chain(i, m)
        works.append(_RoundWork(mine[:, cols].to(device, acc), tuple(names[q] for q in cols), w.to(device, acc),
                                nw.to(device, acc), c, own, offset))
        offset += rnd.evals
    return works


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


class Buffers:
    """Device buffers for one (latent shape, dtype, slots), allocated once and reused by every round and request."""

    def __init__(self, latent: torch.Tensor, slots: int, world: int, noise: int, evals: int):
        kw = dict(device=latent.device, dtype=latent.dtype)
        self.rows = torch.empty(2 + world * slots, *latent.shape, **kw)
        self.drafts = torch.empty(max(slots, 1), *latent.shape, **kw)
        self.noise = torch.empty(max(noise, 1), *latent.shape, **kw)
        self.prev = torch.empty(latent.shape, **kw)  # o_{i-1}, for extrapolated drafts
        self.flags = torch.empty(max(evals, 1), device=latent.device, dtype=torch.float32)
        self.stage = self.result = None  # page-locked host staging (CPU-generator noise) and results on CUDA
        if latent.is_cuda:
            self.stage = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)
            self.result = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)


def replica_generator(ev, generator, device: torch.device):
    """On rank 0 `generator` itself; on the other ranks a generator in the same state, so every rank draws the
    numbers rank 0 draws (generator None: rank 0's default generator of `device`). One broadcast per request."""
    if ev.world == 1:
        return generator
    dev = generator.device if generator is not None else device
    if ev.rank == 0:
        state = generator.get_state() if generator is not None else (
            torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state())
    else:
        probe = torch.Generator(device=dev)
        state = torch.empty_like(probe.get_state())  # the state size is fixed per generator type
    buf = state.to(device)
    ev.broadcast(buf)
    if ev.rank == 0:
        return generator
    probe.set_state(buf.cpu())
    return probe


def draw_noise(out: torch.Tensor, generator, stage=None) -> torch.Tensor:
    """Fill `out` with N(0, 1) exactly as diffusers' randn_tensor(out.shape, generator, ...) would draw it."""
    gen_dev = generator.device.type if generator is not None else out.device.type
    if gen_dev == out.device.type:
        return torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device, out=out)
    # A CPU generator with a CUDA latent: diffusers draws on the CPU and moves; stage through pinned memory.
    host = stage if stage is not None else torch.empty(out.shape, dtype=out.dtype)
    torch.randn(out.shape, generator=generator, dtype=out.dtype, out=host)
    return out.copy_(host, non_blocking=True)


NVTX = os.environ.get("DRIFFUSION_NVTX") == "1"  # perf/nsys.sh sets it; otherwise ranges cost nothing


class _Clock:
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


class Sampler:
    """A persistent draft-and-refine executor for one model. Buffers and round tables live across requests."""

    def __init__(self, model, evaluator=None, cuda_graphs: bool = True):
        self.model = model
        self.ev = evaluator if evaluator is not None else LocalEvaluator(model)
        self.cuda_graphs = cuda_graphs  # used on CUDA latents only
        self._graphs = GraphCache()
        self._buffers, self._works = LRU(8), LRU(64)

    def buffers(self, latent, plan: Plan, traj: Trajectory) -> Buffers:
        slots = max([math.ceil(len(r.drafts) / self.ev.world) for r in plan.rounds] + [0])
        noise = max(sum(traj.noisy[r.anchor: r.anchor + r.advance]) for r in plan.rounds)
        key = (tuple(latent.shape), latent.dtype, latent.device)
        b = self._buffers.get(key)
        if b is None or b.rows.shape[0] < 2 + self.ev.world * slots or b.noise.shape[0] < noise \
                or b.flags.shape[0] < plan.model_evals:
            b = self._buffers[key] = Buffers(latent, slots, self.ev.world, noise, plan.model_evals)
        return b

    def works(self, traj, plan, rule, latent) -> list:
        acc = kernels.fallback.accum_dtype(latent.dtype)
        key = (traj.key, plan, rule, latent.device, acc)
        if key not in self._works:
            self._works[key] = _round_work(traj, plan, rule, self.ev, latent.device, acc)
        return self._works[key]

    def __call__(self, scheduler, x, *, steps, mode="aggressive", parallel=None, generator=None,
                 model_kwargs=None, timesteps_kwargs=None, progress=False, drafts="jump", subintervals=None,
                 preconditioning=None, window=None, tolerance=None, cancel=None, **step_kwargs) -> SampleOutput:
        from . import parasolver
        if mode not in MODES + parasolver.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES + parasolver.MODES)}")
        parallel = self.ev.world if parallel is None else parallel
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point latent tensor [B, ...], got {type(x).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be one torch.Generator, got {type(generator).__name__}")
        iterative = mode in parasolver.MODES
        if drafts not in DRAFT_RULES:
            raise ValueError(f"unknown draft rule {drafts!r}; choose one of {', '.join(DRAFT_RULES)}")
        if iterative:
            if drafts != "jump":
                raise ValueError(f"drafts={drafts!r} applies to the draft-and-refine modes, not mode={mode!r}")
            if not isinstance(parallel, int) or parallel < 1:
                raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
            cfg = parasolver.IterativeConfig.make(mode, steps, parallel, subintervals, preconditioning, window,
                                                  tolerance)
        else:
            extra = {k: v for k, v in dict(subintervals=subintervals, preconditioning=preconditioning, window=window,
                                           tolerance=tolerance).items() if v is not None}
            if extra:
                raise ValueError(f"{sorted(extra)} apply to modes picard and parasolver only, not mode={mode!r}")
            plan = make_plan(mode, steps, parallel)
        traj = scheduler if isinstance(scheduler, Trajectory) else \
            Trajectory.from_scheduler(scheduler, steps, timesteps_kwargs, **step_kwargs)
        if traj.steps != steps:
            raise ValueError(f"the trajectory has {traj.steps} steps, steps={steps}")
        if iterative:
            return parasolver.run(self, traj, x, mode, parallel, cfg, generator, model_kwargs, cancel=cancel)
        return self.run(plan, traj, x, generator, model_kwargs, progress, drafts, cancel=cancel)

    @torch.no_grad()  # sampling never needs gradients: no autograd graph per model call, whatever the model
    def run(self, plan: Plan, traj: Trajectory, x, generator=None, model_kwargs=None, progress=False,
            drafts="jump", cancel=None) -> SampleOutput:
        """Execute `plan`; every rank calls this with the same plan, trajectory and latent shape. `cancel` (an object
        with is_set(), given on every rank or on none; rank 0's counts) stops every rank at a round boundary."""
        ev, rank = self.ev, self.ev.rank
        buf, works = self.buffers(x, plan, traj), self.works(traj, plan, drafts, x)
        named = {"x": buf.rows[0], "o": buf.rows[1], "z": buf.noise[0], "prev": buf.prev}
        graphs = self._graphs if self.cuda_graphs and x.is_cuda else None
        call = ModelCall(self.model, traj, x, model_kwargs, graphs)
        stats = SampleStats(plan.mode, plan.steps, plan.parallel, ideal_speedup=plan.ideal_speedup)
        rows, clock, t0 = buf.rows, _Clock(x.device), time.perf_counter()
        bar = tqdm(total=len(plan.rounds), desc=f"{plan.mode} n={plan.parallel}", unit="round", leave=False,
                   disable=None) if progress and rank == 0 else None  # disable=None: only on a terminal
        torch.mul(x, traj.init_noise_sigma, out=rows[0])
        for r, (rnd, w) in enumerate(zip(plan.rounds, works)):
            if cancel is not None and ev.agree(cancel.is_set()):
                raise Cancelled(f"cancelled before round {r} of {len(plan.rounds)}")
            i, m, k = rnd.anchor, rnd.advance, len(rnd.drafts)
            clock.round(r)
            clock.start("comm")
            ev.broadcast(rows[0])
            if rnd.eval_anchor:
                clock.start("model")
                ev.anchor(call, rows[0:1], (i,), rows[1:2])  # every rank ends with o_i (see DistributedEvaluator)
                self._flag(rows[1:2], buf.flags, w.eval_offset)
                stats.serial_rounds += 1
                stats.model_evals += 1
                stats.batch_widths.append(1)
            clock.start("draft")
            q = len(w.noise_w)
            if rank == 0:  # only rank 0 refines; its slot 0 is draft i+1, the one draft with noise
                for s in range(q):
                    draw_noise(buf.noise[s], generator, buf.stage)
            if k:
                own, c = w.own, w.chunk
                if own:
                    kernels.draft(buf.drafts[: len(own)], [named[n] for n in w.inputs], w.draft_coef)
                gathered = rows[2: 2 + ev.world * c]
                send = ev.send_buffer(gathered)
                clock.start("model")
                if own:
                    ev.call(call, buf.drafts[: len(own)], own, send[: len(own)])
                clock.start("comm")
                ev.gather(gathered, send)
                self._flag(gathered[:k], buf.flags, w.eval_offset + int(rnd.eval_anchor))
                stats.serial_rounds += 1
                stats.model_evals += k
                stats.batch_widths.append(k)
            clock.start("refine")
            if rank == 0:
                noise = buf.noise[:q] if q else None
                kernels.refine(rows[0], rows[: m + 1], w.refine_w, noise, w.noise_w if q else None)
            if drafts == "extrapolate":  # keep the output _previous_output names for the next round
                buf.prev.copy_(rows[m] if plan.mode == "aggressive" else rows[1])
            if rnd.carry is not None:
                rows[1].copy_(rows[1 + m])  # aggressive: draft i+m's output is the next anchor's output
            if bar is not None:
                bar.update()
        clock.round(None)
        if bar is not None:
            bar.close()
        clock.start("comm")
        ev.broadcast(rows[0])  # every rank returns the result
        clock.start("check")
        self._check(plan, traj, buf.flags)
        if buf.result is not None:
            buf.result.copy_(rows[0], non_blocking=True)
        stats.phases = clock.stop()
        stats.wall_time = time.perf_counter() - t0
        return SampleOutput(rows[0].clone(), stats, plan, buf.result)

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


def sample(model, scheduler, x, *, steps, mode="aggressive", parallel=None, generator=None, model_kwargs=None,
           timesteps_kwargs=None, progress=False, drafts="jump", subintervals=None, preconditioning=None, window=None,
           tolerance=None, **step_kwargs) -> SampleOutput:
    """Sample with draft-and-refine parallelism. Returns `.sample` (the final latent) and `.stats`.

    model(x_in, t, **model_kwargs) sees what a diffusers loop gives it: x_in = scale_model_input(x, t), one
    timestep per batch row. x is unit-variance noise [B, ...]; init_noise_sigma is applied here. mode is
    sequential, aggressive or conservative; parallel (n) defaults to the world size (1 outside torchrun).
    step_kwargs are the scheduler's step options (e.g. eta for DDIM); timesteps_kwargs go to set_timesteps
    (e.g. mu for Flux). drafts="jump" drafts with the paper's jumps; "extrapolate" extrapolates the model
    output from the anchor's and the previous output (same model calls, closer drafts). progress shows a tqdm bar of rounds on rank 0. Under torchrun every rank calls this
    with the same arguments (the generator matters on rank 0 only) and every rank receives the result.
    For many requests on one model, keep a `Sampler` instead: its buffers and CUDA graphs persist.

    mode="parasolver" (and "picard", its subintervals = steps case) iterate to a tolerance instead of following
    a fixed plan: subintervals N (default steps // 2), preconditioning M (default 2; picard 0), window p (default
    parallel), tolerance delta (default 0.05; 0 reproduces the sequential sampler). See driffusion_rt/parasolver.py.
    """
    return Sampler(model, default_evaluator(model))(
        scheduler, x, steps=steps, mode=mode, parallel=parallel, generator=generator, model_kwargs=model_kwargs,
        timesteps_kwargs=timesteps_kwargs, progress=progress, drafts=drafts, subintervals=subintervals,
        preconditioning=preconditioning, window=window, tolerance=tolerance, **step_kwargs)
