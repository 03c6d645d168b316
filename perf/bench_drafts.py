"""Jump drafts against extrapolated drafts on the exact Gaussian-mixture model, for every supported scheduler.

For each scheduler, mode and n, the mean relative deviation from the sequential sample (same noise) with the
paper's jump drafts and with drafts="extrapolate", and their ratio (above 1: extrapolated drafts deviate less).
Same model calls and serial rounds in both (the tests count them). Writes drafts.json and drafts.md to --out.

    python perf/bench_drafts.py --out perf/results
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"DDIM epsilon": DDIMScheduler(clip_sample=False, **sd),
            "DDIM v-prediction": DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **sd),
            "Euler epsilon": EulerDiscreteScheduler(**sd),
            "flow matching (shift 3)": FlowMatchEulerDiscreteScheduler(shift=3.0),
            "DDPM (stochastic)": DDPMScheduler(clip_sample=False, **sd)}


def deviation(a, ref) -> float:
    return ((a - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="sampling steps S")
    p.add_argument("--parallel", type=int, nargs="+", default=[2, 4, 8], help="values of n")
    p.add_argument("--components", type=int, default=8, help="Gaussian-mixture components")
    p.add_argument("--samples", type=int, default=16, help="samples per configuration")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for drafts.json / drafts.md")
    args = p.parse_args(argv)
    from driffusion_rt import GaussianMixture, GaussianMixtureModel, sample
    torch.set_num_threads(1)
    mix = GaussianMixture.random(args.components, shape=(4, 8, 8), seed=3)
    x = torch.randn(args.samples, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for name, sched in schedulers().items():
        model = GaussianMixtureModel.for_scheduler(mix, sched, args.steps)
        run = lambda **kw: sample(model, sched, x, steps=args.steps, generator=torch.Generator().manual_seed(1),
                                  **kw).sample
        seq = run(mode="sequential")
        for mode in ("aggressive", "conservative"):
            for n in args.parallel:
                jump, extra = (deviation(run(mode=mode, parallel=n, drafts=d), seq) for d in ("jump", "extrapolate"))
                rows.append(dict(scheduler=name, mode=mode, parallel=n, jump=jump, extrapolate=extra,
                                 ratio=jump / extra if extra else float("inf")))
                print(f"{name:>24} {mode:>12} n={n}: jump {jump:.3e}  extrapolate {extra:.3e}  "
                      f"ratio {rows[-1]['ratio']:.2f}", flush=True)
    head = "| scheduler | mode | " + " | ".join(f"n = {n}" for n in args.parallel) + " |"
    lines = [head, "|" + "---|" * (2 + len(args.parallel))]
    for name in schedulers():
        for mode in ("aggressive", "conservative"):
            cells = [f"{r['ratio']:.2f}x ({r['jump']:.1e} -> {r['extrapolate']:.1e})" for r in rows
                     if r["scheduler"] == name and r["mode"] == mode]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + (f"\n\nCells: deviation ratio jump / extrapolate (jump deviation -> extrapolated deviation), "
                             f"mean relative deviation from sequential over {args.samples} samples; Gaussian mixture "
                             f"of {args.components} components in 4x8x8, exact denoiser, S = {args.steps}, float64.\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "drafts.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "drafts.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
