#!/usr/bin/env python
"""Error-controlled sampling against its peers: serial rounds against deviation from the sequential sample.

One tiny random-weight SD pipeline (tests/tiny_pipelines.py, built offline), float64, run by diffusers' own
ParaDiGMS pipeline (StableDiffusionParadigmsPipeline with DDIMParallelScheduler / DDPMParallelScheduler) and by every
mode of this runtime, with the same weights, prompt, initial latents and noise; the shipped digits model and the
Gaussian mixture (gmm.py, exact denoiser) for this runtime's modes. For each model, scheduler (DDIM, DDPM) and n:
aggressive and conservative (jump and extrapolated drafts), picard, parasolver and ParaDiGMS over a sweep of their
tolerances, and adaptive over a sweep of its tolerance. Per run: serial rounds (model calls one after another), model
evaluations (trajectory points), the mean relative deviation of the final latents from this runtime's sequential
sample, and a MODELED latency: every serial call of w points costs a + b w (one formula for every method, --call-cost
a and --point-cost b, in units of one sequential step a + b), not a measurement.

Writes peers.json, peers.md (the Pareto table per configuration and the targets: at deviations 1e-3 and 1e-4,
adaptive's serial rounds against ParaDiGMS's and against the best fixed mode's) and peers.png (deviation against
serial rounds) to --out. ParaDiGMS's own tolerance is scaled by each step's posterior standard deviation, this
runtime's picard / parasolver tolerance by the state's noise level: the median ratio of the two scales is printed.

    python perf/bench_peers.py                          # the full benchmark (perf/results/peers.*)
    python perf/bench_peers.py --quick --out /tmp/p     # a tiny configuration in seconds (the test suite runs it)
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXED = ("aggressive", "conservative", "picard", "parasolver")
TARGETS = (1e-3, 1e-4)
PROMPT = "a photo of a red cat"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for peers.json / .md / .png")
    p.add_argument("--steps", type=int, default=50, help="sampling steps S (default 50)")
    p.add_argument("--parallel", type=int, nargs="+", default=[4, 8], help="values of n (default 4 8)")
    p.add_argument("--models", nargs="+", default=["sd", "digits", "gmm"], choices=["sd", "digits", "gmm"])
    p.add_argument("--schedulers", nargs="+", default=["ddim", "ddpm"], choices=["ddim", "ddpm"])
    p.add_argument("--adaptive-tolerances", type=float, nargs="+",
                   default=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5])
    p.add_argument("--iterative-tolerances", type=float, nargs="+",
                   default=[0.3, 0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3, 3e-4, 1e-4],
                   help="picard and parasolver tolerances (their own scale, docs/iterative.md)")
    p.add_argument("--paradigms-tolerances", type=float, nargs="+",
                   default=[1.0, 0.3, 0.1, 0.05, 0.02, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 0.0],
                   help="ParaDiGMS tolerances (its own scale; 0 checks that it reproduces the sequential sample)")
    p.add_argument("--samples", type=int, default=None,
                   help="latents per configuration (default: sd 2, digits 10, gmm 16; --quick 1)")
    p.add_argument("--call-cost", type=float, default=1.0, help="a: modeled cost of one model call")
    p.add_argument("--point-cost", type=float, default=0.25, help="b: modeled cost per point in a call")
    p.add_argument("--quick", action="store_true", help="10 steps, n = 2, one tolerance per method, 1 sample")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.parallel = 10, [2]
        args.adaptive_tolerances, args.iterative_tolerances, args.paradigms_tolerances = [1e-2], [0.05], [0.1, 0.0]
    for name, v in (("steps", [args.steps]), ("parallel", args.parallel)):
        if min(v) < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    if args.call_cost < 0 or args.point_cost < 0 or args.call_cost + args.point_cost <= 0:
        p.error("--call-cost and --point-cost must be >= 0 and not both 0")
    return args


def deviation(x, ref) -> float:
    """Mean over samples of |x - ref| / |ref| (perf/quality.py's measure)."""
    x, ref = x.reshape(len(x), -1).double(), ref.reshape(len(ref), -1).double()
    return float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def modeled(widths, args) -> float:
    """Sum over serial calls of (a + b w), in units of one sequential step (a + b)."""
    return sum(args.call_cost + args.point_cost * w for w in widths) / (args.call_cost + args.point_cost)


# ---------------------------------------------------------------------------------------------- the models


class Case:
    """One (model, scheduler): run(options) -> SampleOutput with this runtime, and ParaDiGMS where it exists."""

    def __init__(self, model, sched_name, args):
        from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler, Trajectory
        from driffusion_rt import digits as dg
        from driffusion_rt import schedulers as named
        self.model, self.sched_name, self.args, self.paradigms = model, sched_name, args, None
        S, F64 = args.steps, torch.float64
        seed = torch.Generator().manual_seed(0)
        if model == "gmm":
            sched = named.toy(sched_name)
            self.traj = Trajectory.from_scheduler(sched, S)
            net = GaussianMixtureModel(GaussianMixture.random(8, shape=(4, 8, 8), seed=0), self.traj)
            self.x = torch.randn(args.samples or 16, 4, 8, 8, generator=seed, dtype=F64)
            self.kwargs = None
        elif model == "digits":
            unet, sched = dg.load_digits_model(scheduler=sched_name, dtype=F64)
            net = dg.DigitsModel(unet)
            self.traj = Trajectory.from_scheduler(sched, S)
            b = args.samples or 10
            self.x = torch.randn(b, 1, 8, 8, generator=seed, dtype=F64)
            self.kwargs = {"labels": torch.arange(b) % 10, "guidance_scale": dg.DEFAULT_GUIDANCE}
        else:
            net = self._sd(sched_name, args)
        self.sampler = Sampler(net)

    def _sd(self, sched_name, args):
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        import tiny_pipelines as tp  # the offline tiny pipelines live with the tests
        from diffusers import DDIMParallelScheduler, DDPMParallelScheduler, StableDiffusionParadigmsPipeline
        from driffusion_rt.pipelines import load_pipeline, prepare
        from driffusion_rt.pipelines.family import model_adapter
        pipe = load_pipeline(tp.build_sd(os.path.join(args.tmp, f"sd_{sched_name}"), scheduler="ddim"),
                             dtype=torch.float64)
        pipe.set_progress_bar_config(disable=True)
        # ParaDiGMS's batched DDIM step ends on alpha 1 whatever set_alpha_to_one says (DDIMScheduler honours it):
        # with SD's False it converges 1.4e-3 away from the sequential sample. Both run with True here.
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, set_alpha_to_one=True)
        b = args.samples or 2
        latents = torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        req = prepare(pipe, PROMPT, steps=args.steps, guidance_scale=7.5, num_images=b, height=32, width=32,
                      latents=latents.clone(), generator=torch.Generator().manual_seed(1), scheduler=sched_name)
        self.traj, self.x, self.kwargs, self.prepared = req.trajectory, req.latents, req.model_kwargs, req
        parallel_cls = {"ddim": DDIMParallelScheduler, "ddpm": DDPMParallelScheduler}[sched_name]
        peer = StableDiffusionParadigmsPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=parallel_cls.from_config(pipe.scheduler.config, clip_sample=False), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        peer.set_progress_bar_config(disable=True)
        calls, counting = [], [False]
        peer.unet.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]) if counting[0] else None)

        def paradigms(n, tol):
            calls.clear()
            counting[0] = True
            try:
                out = peer(PROMPT, height=32, width=32, num_inference_steps=args.steps, parallel=n, tolerance=tol,
                           guidance_scale=7.5, num_images_per_prompt=b, latents=latents.clone(),
                           generator=torch.Generator().manual_seed(1), output_type="latent").images
            finally:
                counting[0] = False
            return out, [c // (2 * b) for c in calls]  # points per call (guidance doubles the rows)
        self.paradigms = paradigms
        return model_adapter(pipe)

    def run(self, **options):
        gen = torch.Generator().manual_seed(1)
        from driffusion_rt.options import SamplingOptions
        if self.model == "sd":
            prepared = dataclasses.replace(self.prepared, generator=gen)
            return self.sampler.apply(prepared, SamplingOptions(**options))
        return self.sampler(self.traj, self.x, steps=self.args.steps, model_kwargs=self.kwargs, generator=gen,
                            **options)

    def scale_ratio(self) -> float | None:
        """Median over steps of sigma_i / (the step's posterior std): ParaDiGMS's tolerance scale against picard's."""
        a = self.traj.alpha[: self.traj.steps + 1] ** 2
        ratios = []
        for i in range(self.traj.steps - 1):
            abar_t, abar_p = float(a[i]), float(a[i + 1])
            var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)
            if var > 0 and math.isfinite(var):
                ratios.append(float(self.traj.sigma[i]) / math.sqrt(var))
        return statistics.median(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------- runs


def sweep(case: Case, n: int, seq, args) -> list:
    rows = []

    def add(method, setting, sample_, widths, t0):
        rows.append(dict(method=method, setting=setting, serial_rounds=len(widths), model_evals=sum(widths),
                         deviation=deviation(sample_, seq), modeled_latency=modeled(widths, args),
                         wall_s=time.perf_counter() - t0))
        r = rows[-1]
        print(f"  {case.model}/{case.sched_name} n={n} {method:>12} {setting:>16}: {r['serial_rounds']:3d} rounds "
              f"{r['model_evals']:4d} evals dev {r['deviation']:.2e} modeled {r['modeled_latency']:.1f}", flush=True)

    for mode in ("aggressive", "conservative"):
        for drafts in ("jump", "extrapolate"):
            t0 = time.perf_counter()
            try:
                out = case.run(mode=mode, parallel=n, drafts=drafts)
            except ValueError as e:  # a combination the runtime refuses (named in the row)
                print(f"  {mode} {drafts}: refused: {e}")
                continue
            add(mode, f"drafts={drafts}", out.sample, out.stats.batch_widths, t0)
    for mode in ("picard", "parasolver"):
        for tol in args.iterative_tolerances:
            t0 = time.perf_counter()
            out = case.run(mode=mode, parallel=n, tolerance=tol)
            add(mode, f"tol={tol:g}", out.sample, out.stats.batch_widths, t0)
    for tol in args.adaptive_tolerances:
        t0 = time.perf_counter()
        out = case.run(mode="adaptive", parallel=n, tolerance=tol)
        add("adaptive", f"tol={tol:g}", out.sample, out.stats.batch_widths, t0)
        rows[-1]["tolerance"], rows[-1]["estimate"] = tol, out.stats.estimate
    if case.paradigms is not None:
        for tol in args.paradigms_tolerances:
            t0 = time.perf_counter()
            lat, widths = case.paradigms(n, tol)
            add("ParaDiGMS", f"tol={tol:g}", lat, widths, t0)
    return rows


def pareto(rows) -> None:
    """Mark every run no other run beats in both serial rounds and deviation."""
    for r in rows:
        r["pareto"] = not any(o is not r and o["serial_rounds"] <= r["serial_rounds"] and o["deviation"] <= r["deviation"]
                              and (o["serial_rounds"], o["deviation"]) != (r["serial_rounds"], r["deviation"])
                              for o in rows)


def fewest(rows, methods, d) -> dict | None:
    """The run of `methods` with the fewest serial rounds at deviation <= d (ties: the lower deviation)."""
    ok = [r for r in rows if r["method"] in methods and r["deviation"] <= d]
    return min(ok, key=lambda r: (r["serial_rounds"], r["deviation"])) if ok else None


def targets(rows) -> list:
    out = []
    for d in TARGETS:
        ad, peer, fixed = fewest(rows, ("adaptive",), d), fewest(rows, ("ParaDiGMS",), d), fewest(rows, FIXED, d)
        t = dict(deviation=d, adaptive=ad and ad["serial_rounds"], paradigms=peer and peer["serial_rounds"],
                 fixed=fixed and fixed["serial_rounds"], fixed_method=fixed and f"{fixed['method']} {fixed['setting']}")
        t["vs_paradigms"] = t["adaptive"] / t["paradigms"] if ad and peer else None
        t["paradigms_met"] = None if peer is None else bool(ad and t["vs_paradigms"] <= 0.75)
        t["fixed_met"] = None if fixed is None else bool(ad and t["adaptive"] <= t["fixed"])
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------- output


def _yes(v):
    return "-" if v is None else ("met" if v else "NOT met")


def markdown(groups, args, ratios) -> str:
    lines = ["# Error-controlled sampling against its peers", "",
             f"Serial rounds against the mean relative deviation of the final latents from this runtime's sequential "
             f"sample, S = {args.steps}, float64. Modeled latency: every serial call of w points costs a + b w with "
             f"a = {args.call_cost:g}, b = {args.point_cost:g}, in units of one sequential step (modeled, not "
             f"measured). Pareto: no other run of the configuration has fewer or equal serial rounds and a lower "
             f"or equal deviation.", "", "## Targets", "",
             "At deviation <= D, the fewest serial rounds of adaptive, of ParaDiGMS (target: adaptive at most 0.75x) "
             "and of the best fixed mode of this runtime (aggressive, conservative, picard, parasolver; target: "
             "adaptive at most as many).", "",
             "| model | scheduler | n | D | adaptive | ParaDiGMS | adaptive / ParaDiGMS | target 0.75x | best fixed mode "
             "| rounds | target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        for t in g["targets"]:
            lines.append(f"| {g['model']} | {g['scheduler']} | {g['parallel']} | {t['deviation']:g} | "
                         f"{t['adaptive'] or '-'} | {t['paradigms'] or '-'} | "
                         f"{'-' if t['vs_paradigms'] is None else format(t['vs_paradigms'], '.2f')} | "
                         f"{_yes(t['paradigms_met'])} | {t['fixed_method'] or '-'} | {t['fixed'] or '-'} | "
                         f"{_yes(t['fixed_met'])} |")
    lines += ["", "## Runs", ""]
    for g in groups:
        lines += [f"### {g['model']}, {g['scheduler']}, n = {g['parallel']}", "",
                  "| method | setting | serial rounds | model evaluations | deviation | modeled latency | Pareto |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(g["rows"], key=lambda r: (r["serial_rounds"], r["deviation"])):
            lines.append(f"| {r['method']} | {r['setting']} | {r['serial_rounds']} | {r['model_evals']} | "
                         f"{r['deviation']:.2e} | {r['modeled_latency']:.1f} | {'yes' if r['pareto'] else ''} |")
        lines.append("")
    lines += ["## Tolerance scales", "",
              "Median over steps of sigma_i / sqrt(posterior variance of step i), ParaDiGMS's scale against this "
              "runtime's picard / parasolver scale (docs/iterative.md):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in ratios.items() if v is not None]
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                  f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}; models: the tiny random-weight SD pipeline "
                  f"of tests/tiny_pipelines.py (prompt {PROMPT!r}, guidance 7.5, 32x32), the shipped digits model "
                  f"(guidance {1.25}), the 8-component Gaussian mixture in 4x8x8 with its exact denoiser."]
    return "\n".join(lines) + "\n"


def plot(groups, path):
    import matplotlib  # optional (the perf extra): only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = len({g["parallel"] for g in groups})
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    style = {"adaptive": ("C3", "o-"), "ParaDiGMS": ("k", "s--"), "picard": ("C0", "^:"), "parasolver": ("C2", "v:"),
             "aggressive": ("C1", "D"), "conservative": ("C4", "P")}
    for k, g in enumerate(groups):
        ax = axes.flat[k]
        for method, (color, marker) in style.items():
            pts = sorted((r["serial_rounds"], r["deviation"]) for r in g["rows"]  # not the tolerance-0 check
                         if r["method"] == method and r["deviation"] > 1e-12)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, ms=4, lw=1, label=method)
        ax.set(yscale="log", xlabel="serial rounds", ylabel="deviation from sequential",
               title=f"{g['model']} {g['scheduler']} n={g['parallel']}")
        for d in TARGETS:
            ax.axhline(d, color="gray", lw=0.5)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    groups, ratios, t0 = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as args.tmp:  # the tiny pipeline is built here and loaded back by path
        for model in args.models:
            for sched in args.schedulers:
                case = Case(model, sched, args)
                ratios[f"{model} {sched}"] = case.scale_ratio()
                seq = case.run(mode="sequential").sample
                for n in args.parallel:
                    rows = sweep(case, n, seq, args)
                    pareto(rows)
                    groups.append(dict(model=model, scheduler=sched, parallel=n, rows=rows, targets=targets(rows)))
    del args.tmp
    md = markdown(groups, args, ratios)
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump({"groups": groups, "scale_ratios": ratios, "args": vars(args), "wall_s": time.perf_counter() - t0,
                   "machine": platform.machine(), "torch": torch.__version__}, f, indent=2)
    plot(groups, os.path.join(args.out, "peers.png"))
    print(md.split("## Runs")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
