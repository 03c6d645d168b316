"""Command line: `python -m driffusion_rt.generate` (one process) or under `torchrun --nproc_per_node=N`.

With no --model it samples the built-in analytic Gaussian-mixture model and reports the plan's ideal critical
path against the measured run.
"""
import argparse
import sys

import torch

from .gmm import GaussianMixture, GaussianMixtureModel
from .plan import MODES
from .sampler import sample

SCHEDULERS = ("ddim", "ddpm", "euler", "flow")


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
    p.add_argument("--mode", default="aggressive", choices=MODES,
                   help="sequential: the scheduler's own loop; aggressive: ~1/n latency; conservative: ~2/(n+1)")
    p.add_argument("--parallel", type=int, default=None,
                   help="n, model evaluations per parallel round (default: the number of ranks, 1 outside torchrun)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps S")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS, help="sampler for the Gaussian-mixture model")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of stochastic steps)")
    p.add_argument("--num-images", type=int, default=4, help="samples per request (the latent batch)")
    p.add_argument("--show-plan", action="store_true", help="print every round of the plan")
    return p


def positive(p, args, *names):
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def report(plan, stats) -> str:
    """The measured-versus-ideal table printed at the end of a run."""
    per_eval = stats.phases.get("model", 0.0) / max(stats.serial_rounds, 1)
    ideal = plan.serial_rounds * per_eval
    rows = [("mode", plan.mode), ("steps S", plan.steps), ("parallel n", plan.parallel),
            ("serial model rounds (plan / measured)", f"{plan.serial_rounds} / {stats.serial_rounds}"),
            ("model evaluations (plan / measured)", f"{plan.model_evals} / {stats.model_evals}"),
            ("ideal speedup over sequential", f"{plan.ideal_speedup:.2f}x"),
            ("measured latency", f"{stats.wall_time * 1e3:.1f} ms"),
            ("ideal latency (serial rounds x mean model-call time)", f"{ideal * 1e3:.1f} ms"),
            ("efficiency (ideal / measured)", f"{ideal / stats.wall_time:.3f}" if stats.wall_time else "-")]
    rows += [(f"  phase {k}", f"{v * 1e3:.2f} ms") for k, v in stats.phases.items()]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    positive(p, args, "parallel", "steps", "num_images")
    sched = make_scheduler(args.scheduler)
    mixture = GaussianMixture.random(8, shape=(4, 16, 16), seed=0)
    model = GaussianMixtureModel.for_scheduler(mixture, sched, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.num_images, *mixture.shape, generator=g, dtype=torch.float64)
    out = sample(model, sched, x, steps=args.steps, mode=args.mode, parallel=args.parallel, generator=g)
    plan = out.plan
    print(plan.describe() if args.show_plan else plan.describe().splitlines()[0])
    print(report(plan, out.stats))
    labels = mixture.classify(out.sample).tolist()
    print(f"samples landed on mixture components {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
