"""The draft-and-refine sampler: executes a plan against an evaluator (docs/design.md sections 1-3).

A `Sampler` keeps what outlives a request for one model on this rank: the evaluator, the arenas (arena.py), the
round tables and the CUDA graphs. It takes a request either as keyword options (`sampler(scheduler, x, steps=...,
mode=...)`, what `sample` does) or prepared (`sampler.apply(prepared, options)`: a `Prepared` trajectory, latents,
model kwargs, generator and blend, with one `SamplingOptions`), which is how every entry point of the runtime
applies a request. A draft-and-refine request is a `Run` (run.py) that `run` advances one model call at a time:

  [evaluate o_i] -> draw the round's noise -> draft this rank's slots in one fused pass -> model -> all-gather the
  outputs -> refine x_{i+m} and the scheduler's registers in one pass.

Every rank refines from the same gathered outputs with the same noise, so every rank holds the same anchor bit for
bit and one collective per round suffices (the all-gather; anchors on CPU ranks add a broadcast). `start` hands
out a run without driving it: a batch (batch.py) drives the runs of many requests with one model call.
"""
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import adaptive, kernels, parasolver
from .arena import LRU, ArenaPool, round_tables
from .cuda_graphs import GraphCache
from .distributed import default_evaluator
from .evaluator import LocalEvaluator
from .options import SamplingOptions
from .plan import MODES, Plan
from .results import Cancelled, SampleOutput
from .run import ANCHOR, Run, device_scope
from .trajectory import Trajectory

# Stochastic schedulers keep the sequential sample's spread (within 5%) from this many model calls per parallel
# evaluation on; below it their noise amplifies draft errors (perf/bench_spread.py, perf/results/spread.md).
STOCHASTIC_CALLS_PER_N = 8

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


class Sampler:
    """A persistent draft-and-refine executor for one model. Arenas, round tables and CUDA graphs live across
    requests."""

    def __init__(self, model, evaluator=None, cuda_graphs: bool = True, layout=None):
        self.model = model
        self.ev = evaluator if evaluator is not None else LocalEvaluator(model)
        self.cuda_graphs = cuda_graphs  # used on CUDA latents only
        self.layout = layout  # the parallel layout layout.parallelize built this sampler on (None: not built there)
        self._graphs = GraphCache()
        self.arenas, self._tables = ArenaPool(), LRU(64)

    def tables(self, traj, plan, rule, x) -> tuple:
        """(Rows, tables[rank][round]) of a plan on this job's draft ranks, built once and kept."""
        acc = kernels.fallback.accum_dtype(x.dtype)
        key = (traj.key, plan, rule, x.device, acc)
        if key not in self._tables:
            self._tables[key] = round_tables(traj, plan, rule, self.ev.world, x.device, acc)
        return self._tables[key]

    def start(self, plan: Plan, traj: Trajectory, x, generator=None, model_kwargs=None, drafts="jump",
              blend=None) -> Run:
        """A run of `plan` on this rank, not yet driven (every rank starts the same runs in the same order: the
        replica generator is a broadcast). Close it when done with it."""
        lay, tables = self.tables(traj, plan, drafts, x)
        graphs = self._graphs if self.cuda_graphs and x.is_cuda else None
        return Run(self.ev, self.model, plan, traj, x, lay, tables, self.arenas, generator, model_kwargs, blend,
                   graphs)

    def begin(self, prepared: "Prepared", options: SamplingOptions, parallel: int | None = None) -> Run:
        """`start` for a prepared request in a draft-and-refine mode, with n = `parallel` (default: the options')."""
        n = parallel if parallel is not None else options.n(self.ev.world)
        traj = prepared.trajectory
        return self.start(options.plan(traj.steps, n), traj, prepared.latents, prepared.generator,
                          prepared.model_kwargs, options.drafts, prepared.blend)

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
        with device_scope(x.device):
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
        run = self.start(plan, traj, x, generator, model_kwargs, drafts, blend)
        bar = tqdm(total=len(plan.rounds), desc=f"{plan.mode} n={plan.parallel}", unit="round", leave=False,
                   disable=None) if progress and ev.is_root else None  # disable=None: only on a terminal
        try:
            checked = -1
            while not run.done:
                if run.r != checked:  # a round boundary
                    if bar is not None:
                        bar.update(run.r - max(checked, 0))
                    checked = run.r
                    if cancel is not None and ev.agree(cancel.is_set()):
                        raise Cancelled(f"cancelled before round {run.r} of {len(plan.rounds)}")
                if run.pending.kind == ANCHOR:
                    states, idx = run.states(0)
                    run.clock.start("model")
                    ev.anchor(run.call, states, idx, run.outputs())  # every rank ends with o_i
                else:
                    states, idx = run.states(ev.rank)
                    gathered = run.outputs()
                    send = ev.send_buffer(gathered)
                    run.clock.start("model")
                    if idx:
                        ev.call(run.call, states, idx, send[: len(idx)])
                    run.clock.start("comm")
                    ev.gather(gathered, send)
                run.update()
            if bar is not None:
                bar.update(run.r - max(checked, 0))
            return run.finish()
        finally:
            run.close()
            if bar is not None:
                bar.close()

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
