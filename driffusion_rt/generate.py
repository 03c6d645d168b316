"""Sample with draft-and-refine parallelism: `python -m driffusion_rt.generate`, or one rank per device with
`torchrun --nproc_per_node=N -m driffusion_rt.generate`.

Every rank loads its model replica once; rank 0 prints progress and the measured-versus-ideal table and writes
the outputs (atomically, only when the run succeeds).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from .distributed import DEFAULT_TIMEOUT_S, default_evaluator, maybe_init_dist
from .fixed_cost import FixedCostModel
from .gmm import GaussianMixture, GaussianMixtureModel
from .outputs import atomic_write
from .parasolver import MODES as ITERATIVE_MODES
from .plan import MODES
from .sampler import DRAFT_RULES, Sampler

SCHEDULERS = ("ddim", "ddpm", "euler", "flow")
BUILTIN_MODELS = ("gmm", "fixed")


def make_scheduler(name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sd),
            "ddpm": lambda: DDPMScheduler(clip_sample=False, **sd),
            "euler": lambda: EulerDiscreteScheduler(**sd),
            "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}[name]()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m driffusion_rt.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gmm",
                   help="gmm: the analytic Gaussian-mixture model; fixed: a model costing --model-cost seconds per call "
                        "(measures the runtime's own overhead)")
    p.add_argument("--model-cost", type=float, default=0.04, help="seconds per call of --model fixed")
    p.add_argument("--mode", default="aggressive", choices=MODES + ITERATIVE_MODES,
                   help="sequential: the scheduler's own loop; aggressive: ~1/n latency; conservative: ~2/(n+1); "
                        "picard / parasolver: iterate to --tolerance (exact at 0, more model evaluations)")
    p.add_argument("--drafts", default="jump", choices=DRAFT_RULES,
                   help="jump: the paper's drafts; extrapolate: drafts from the anchor output extrapolated with the "
                        "previous output (same model calls; falls back to jump for stochastic steps)")
    p.add_argument("--parallel", type=int, default=None,
                   help="n, model evaluations per parallel round (default: the number of ranks, 1 outside torchrun)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps S")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler for the built-in models")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of stochastic steps)")
    p.add_argument("--num-images", type=int, default=4, help="samples per request (the latent batch)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"),
                   help="latent and model dtype")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs before the measured one (compilation, buffers, CUDA-graph capture)")
    it = p.add_argument_group("picard / parasolver")
    it.add_argument("--subintervals", type=int, default=None, help="N subintervals (parasolver; default steps // 2)")
    it.add_argument("--preconditioning", type=int, default=None,
                    help="M subintervals solved sequentially first (default 2; picard 0)")
    it.add_argument("--window", type=int, default=None, help="p boundaries solved in parallel (default --parallel)")
    it.add_argument("--tolerance", type=float, default=None, help="delta of the stopping rule (default 0.05)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait for the other ranks before the job fails")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the model eagerly on GPU (graphs are on by default)")
    p.add_argument("--out", default=None, help="directory for the outputs (run.json, samples); nothing is written without it")
    p.add_argument("--show-plan", action="store_true", help="print every round of the plan")
    return p


def check_args(p, args):
    for name in ("parallel", "steps", "num_images"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.model not in BUILTIN_MODELS:
        p.error(f"--model {args.model!r} is not one of the built-in models {', '.join(BUILTIN_MODELS)}")


def build_job(args, device):
    """(model, scheduler, unit-noise latent, model_kwargs, finish) for the chosen model; finish(out) runs on rank 0."""
    dtype = getattr(torch, args.dtype)
    sched = make_scheduler(args.scheduler)
    g = torch.Generator().manual_seed(args.seed)
    mixture = GaussianMixture.random(8, shape=(4, 16, 16), seed=0)
    x = torch.randn(args.num_images, *mixture.shape, generator=g).to(device, dtype)
    if args.model == "fixed":
        return FixedCostModel(args.model_cost), sched, x, None, lambda out: {}
    model = GaussianMixtureModel.for_scheduler(mixture, sched, args.steps)

    def finish(out):
        labels = mixture.classify(out.sample.cpu()).tolist()
        print(f"samples landed on mixture components {labels}")
        return {"components": labels}
    return model, sched, x, None, finish


def report(plan, stats) -> str:
    """The measured-versus-ideal table printed at the end of a run (plan is None for the iterative modes)."""
    per_round = stats.phases.get("model", 0.0) / max(stats.serial_rounds, 1)
    planned = plan.serial_rounds if plan else stats.serial_rounds
    ideal = planned * per_round
    rows = [("mode", stats.mode), ("steps S", stats.steps), ("parallel n", stats.parallel)]
    if plan:
        rows += [("serial model rounds (plan / measured)", f"{plan.serial_rounds} / {stats.serial_rounds}"),
                 ("model evaluations (plan / measured)", f"{plan.model_evals} / {stats.model_evals}")]
    else:
        rows += [("iterations", stats.iterations), ("serial model rounds (measured)", stats.serial_rounds),
                 ("model evaluations (measured)", stats.model_evals)]
    rows += [("ideal speedup over sequential", f"{stats.ideal_speedup:.2f}x"),
            ("measured latency", f"{stats.wall_time * 1e3:.1f} ms"),
            ("ideal latency (serial rounds x mean model-call time)", f"{ideal * 1e3:.1f} ms"),
            ("efficiency (ideal / measured)", f"{ideal / stats.wall_time:.3f}" if stats.wall_time else "-")]
    rows += [(f"  phase {k}", f"{v * 1e3:.2f} ms") for k, v in stats.phases.items()]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


@record
def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    info = maybe_init_dist(args.timeout)
    rank, device = (info.rank, info.device) if info else (0, torch.device("cpu"))
    try:
        t0 = time.perf_counter()
        model, sched, x, model_kwargs, finish = build_job(args, device)
        sampler = Sampler(model, default_evaluator(model), cuda_graphs=not args.no_cuda_graphs)
        load_s = time.perf_counter() - t0

        iterative = {k: getattr(args, k) for k in ("subintervals", "preconditioning", "window", "tolerance")
                     if getattr(args, k) is not None}

        def run(progress):
            return sampler(sched, x, steps=args.steps, mode=args.mode, parallel=args.parallel, progress=progress,
                           generator=torch.Generator().manual_seed(args.seed + 1), model_kwargs=model_kwargs,
                           drafts=args.drafts, **iterative)
        for _ in range(args.warmup):
            run(False)
        out = run(rank == 0)
        if rank == 0:
            if out.plan is not None:
                print(out.plan.describe() if args.show_plan else out.plan.describe().splitlines()[0])
            else:
                print(f"{args.mode}: {out.stats.iterations} iterations, window trace (start, width, stride) "
                      f"{out.stats.trace}")
            print(f"ranks {info.world if info else 1} ({info.backend if info else 'local'}), model load {load_s:.2f} s")
            print(report(out.plan, out.stats))
            extra = finish(out)
            if args.out:
                write_run(args, info, out, extra, load_s)
    except BaseException as e:
        print(f"driffusion_rt: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    if info is not None:
        dist.destroy_process_group()
    return 0


def write_run(args, info, out, extra, load_s):
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "samples.pt"), lambda f: torch.save(out.sample.cpu(), f))
    run = {"args": vars(args), "ranks": info.world if info else 1, "load_s": load_s,
           "ideal_speedup": out.stats.ideal_speedup,
           "stats": out.stats.as_dict(), **extra}
    atomic_write(os.path.join(args.out, "run.json"), lambda f: f.write(json.dumps(run, indent=2).encode()))
    print(f"wrote {args.out}/run.json and samples.pt")


if __name__ == "__main__":
    sys.exit(main())
