"""Stochastic schedulers in parallel: does the sample keep the sequential sampler's spread?

Drafts carry the noise draws the refine will add (rounds.py), so the model sees the noise it must remove. With too
few steps per parallel evaluation the stochastic steps amplify every draft error and the spread grows anyway. For
each stochastic scheduler, steps S and n, this measures std(parallel sample - data mean) / std(sequential sample -
data mean) on exact Gaussian data (a one-component mixture: the denoiser is exact), with noise-consistent drafts and,
for comparison, with noise-free drafts (the paper's, and this runtime's before). The smallest number of model calls
per parallel evaluation (calls / n; calls = S, or 2S - 1 for KDPM2) from which every measured point stays within 5%
is the scheduler's safe ratio; the sampler warns below the largest of them (sampler.STOCHASTIC_CALLS_PER_N).

--multistep measures the deterministic multistep schedulers (DPM++ 2M, UniPC bh2 with its corrector, DEIS, PNDM;
DDIM for reference) the same way, with the mean relative deviation from the sequential sample too, in aggressive,
conservative and adaptive (default tolerance) mode; the safe ratio found here is the one below which conservative mode warns for a multistep scheduler
(options.MULTISTEP_CONSERVATIVE_CALLS_PER_N; docs/schedulers.md explains where the drift comes from).

    python perf/bench_spread.py --out perf/results       # writes spread.json and spread.md
    python perf/bench_spread.py --multistep               # writes spread_multistep.json and spread_multistep.md
"""
import argparse
import json
import os
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def schedulers():
    """(name, class name, scheduler, step options): the stochastic schedulers the runtime is tested with."""
    import diffusers as d
    return [("DDPM", d.DDPMScheduler(clip_sample=False, **SD), {}),
            ("DDIM eta=1", d.DDIMScheduler(clip_sample=False, **SD), {"eta": 1.0}),
            ("Euler ancestral", d.EulerAncestralDiscreteScheduler(**SD), {}),
            ("DPM++ 2M SDE", d.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **SD), {}),
            ("KDPM2 ancestral", d.KDPM2AncestralDiscreteScheduler(**SD), {}),
            ("SA-Solver", d.SASolverScheduler(**SD), {})]


def multistep_schedulers():
    """(name, scheduler): deterministic schedulers with registers, and DDIM (none) for reference."""
    from driffusion_rt import schedulers as named
    base = named.toy("ddim").config
    return [(name, named.build(key, base)) for name, key in (("DDIM", "ddim"), ("DPM++ 2M", "dpm++2m"),
                                                             ("UniPC bh2 + corrector", "unipc"), ("DEIS", "deis"),
                                                             ("PNDM", "pndm"))]


def multistep(args) -> int:
    """Spread and deviation of deterministic multistep schedulers in aggressive, conservative and adaptive mode.
    The fixed modes run their plans directly (Sampler.run: no warnings)."""
    from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler, Trajectory, make_plan
    torch.set_num_threads(1)
    mix = GaussianMixture.random(1, shape=(4, 8, 8), seed=0, std=0.5)
    mean = mix.means.view(1, 4, 8, 8)
    x = torch.randn(args.samples, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for name, sched in multistep_schedulers():
        for steps in args.steps:
            traj = Trajectory.from_scheduler(sched, steps)
            S = traj.steps  # PNDM calls the model S + 1 times
            smp = Sampler(GaussianMixtureModel(mix, traj))
            seq = smp.run(make_plan("sequential", S, 1), traj, x).sample
            ref = (seq - mean).std().item()
            for n in args.parallel:
                row = dict(scheduler=name, steps=steps, calls=S, registers=not traj.history_free, parallel=n,
                           calls_per_n=S / n)
                for mode in ("aggressive", "conservative", "adaptive"):
                    if mode == "adaptive":
                        out = smp(traj, x, steps=steps, mode=mode, parallel=n)
                    else:
                        out = smp.run(make_plan(mode, S, n), traj, x)
                    row[mode] = (out.sample - mean).std().item() / ref
                    row[f"{mode}_dev"] = ((out.sample - seq).flatten(1).norm(dim=1) / seq.flatten(1).norm(dim=1)
                                          ).mean().item()
                    row[f"{mode}_rounds"] = out.stats.serial_rounds
                rows.append(row)
                print(f"{name:>22} S={steps:3d} n={n}: " + "  ".join(
                    f"{m} {row[m]:.3f} / {row[m + '_dev']:.1e} ({row[m + '_rounds']})"
                    for m in ("aggressive", "conservative", "adaptive")), flush=True)
    safe = safe_ratios(rows, [name for name, _ in multistep_schedulers()], lambda r: abs(r["conservative"] - 1),
                       args.tolerance)
    lines = ["| scheduler | S | n | calls / n | aggressive spread / dev. (rounds) | conservative spread / dev. (rounds) "
             "| adaptive spread / dev. (rounds) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {r['steps']} | {r['parallel']} | {r['calls_per_n']:g} | " + " | ".join(
            f"{r[m]:.3f} / {r[m + '_dev']:.1e} ({r[m + '_rounds']})" for m in ("aggressive", "conservative",
                                                                                "adaptive")) + " |")
    lines += ["", f"Safe model calls per parallel evaluation for conservative mode (every measured point at or above "
                  f"it within {args.tolerance:.0%} of the sequential spread):", ""]
    lines += [f"- {name}: {v:g}" if v is not None else f"- {name}: none in the grid" for name, v in safe.items()]
    lines += ["", f"spread: std(sample - data mean) over the sequential run's; dev.: mean relative deviation from the "
                  f"sequential sample; adaptive at its default tolerance (1e-3). Gaussian data in 4x8x8 (std 0.5), "
                  f"exact denoiser, SD betas, {args.samples} samples, float64, seed 0."]
    return write(args, "spread_multistep", rows, safe, lines)


def safe_ratios(rows, names, worst, tolerance) -> dict:
    """Per scheduler: the smallest calls per n from which every measured point has worst(row) <= tolerance."""
    safe = {}
    for name in names:
        mine = [r for r in rows if r["scheduler"] == name]
        bad = [r["calls_per_n"] for r in mine if worst(r) > tolerance]
        ok = [r["calls_per_n"] for r in mine if not bad or r["calls_per_n"] > max(bad)]
        safe[name] = min(ok) if ok else None
    return safe


def write(args, stem, rows, safe, lines) -> int:
    """<stem>.json and <stem>.md to --out; prints the safe ratios."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump({"rows": rows, "safe_calls_per_n": safe, "tolerance": args.tolerance, "args": vars(args)}, f,
                  indent=2)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(safe) - 3:]))
    return 0


def noise_free(weights):
    """Round weights with the noise terms of every draft removed (the paper's noise-free drafts)."""
    from dataclasses import replace
    return [replace(w, drafts=tuple({k: c for k, c in d.items() if not (isinstance(k, tuple) and k[0] == "z")}
                                    for d in w.drafts)) for w in weights]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 30, 40, 50, 75, 100])
    p.add_argument("--parallel", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--samples", type=int, default=64, help="samples per configuration")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed relative change of the spread")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for spread.json / spread.md")
    p.add_argument("--multistep", action="store_true",
                   help="deterministic multistep schedulers instead (spread_multistep.json / .md)")
    args = p.parse_args(argv)
    if args.multistep:
        return multistep(args)
    from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler, Trajectory, rounds, sampler
    torch.set_num_threads(1)
    mix = GaussianMixture.random(1, shape=(4, 8, 8), seed=0, std=0.5)
    mean = mix.means.view(1, 4, 8, 8)
    x = torch.randn(args.samples, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for name, sched, kw in schedulers():
        for steps in args.steps:
            model = GaussianMixtureModel.for_scheduler(mix, sched, steps, **kw)
            run = lambda mode, n=1: Sampler(model)(sched, x, steps=steps, mode=mode, parallel=n,  # noqa: E731
                                                  generator=torch.Generator().manual_seed(1), **kw).sample
            ref = (run("sequential") - mean).std().item()
            calls = Trajectory.from_scheduler(sched, steps, **kw).steps
            for n in args.parallel:
                row = dict(scheduler=name, steps=steps, calls=calls, parallel=n, calls_per_n=calls / n)
                for mode in ("aggressive", "conservative"):
                    row[mode] = (run(mode, n) - mean).std().item() / ref
                    with mock.patch.object(sampler, "round_weights",
                                           lambda *a: noise_free(rounds.round_weights(*a))):
                        row[f"{mode}_noise_free"] = (run(mode, n) - mean).std().item() / ref
                rows.append(row)
                print(f"{name:>16} S={steps:3d} n={n}: aggressive {row['aggressive']:.3f} "
                      f"(noise-free {row['aggressive_noise_free']:.3f}), conservative {row['conservative']:.3f} "
                      f"(noise-free {row['conservative_noise_free']:.3f})", flush=True)
    safe = safe_ratios(rows, [name for name, *_ in schedulers()],
                       lambda r: max(abs(r["aggressive"] - 1), abs(r["conservative"] - 1)), args.tolerance)
    lines = ["| scheduler | S | model calls | n | calls / n | aggressive | conservative | aggressive, noise-free "
             "drafts | conservative, noise-free drafts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {r['steps']} | {r['calls']} | {r['parallel']} | {r['calls_per_n']:g} | "
                     f"{r['aggressive']:.3f} | {r['conservative']:.3f} | {r['aggressive_noise_free']:.3f} | "
                     f"{r['conservative_noise_free']:.3f} |")
    lines += ["", f"Safe model calls per parallel evaluation (every measured point at or above it within "
                  f"{args.tolerance:.0%} of the sequential spread):", ""]
    lines += [f"- {name}: {v:g}" if v is not None else f"- {name}: none in the grid" for name, v in safe.items()]
    lines += ["", f"std(sample - data mean) of the parallel run over the sequential run's; Gaussian data in 4x8x8 "
                  f"(std 0.5), exact denoiser, SD betas, {args.samples} samples, float64, seed 0."]
    return write(args, "spread", rows, safe, lines)


if __name__ == "__main__":
    raise SystemExit(main())
