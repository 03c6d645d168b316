"""Draft + refine time per round for multistep schedulers against DDIM's (issue: multistep history must not make a
round expensive). A model that costs nothing (it returns a constant) isolates the runtime's own work per round:
the draft combine, the refine combine (more input and output rows with registers), the noise draws and the checks.

    python perf/bench_rounds.py --out perf/results        # writes rounds.json and rounds.md

On a GPU the phases are CUDA-event times of the compiled Triton kernel; on a CPU the torch fallback's wall times.
"""
import argparse
import json
import os
import platform
import statistics

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def schedulers():
    import diffusers as d
    return {"DDIM": (d.DDIMScheduler(clip_sample=False, **SD), {}),
            "DPM++ 2M": (d.DPMSolverMultistepScheduler(**SD), {}),
            "DPM++ 3M": (d.DPMSolverMultistepScheduler(solver_order=3, **SD), {}),
            "UniPC": (d.UniPCMultistepScheduler(**SD), {}),
            "PNDM": (d.PNDMScheduler(skip_prk_steps=True, **SD), {}),
            "DDPM (noise)": (d.DDPMScheduler(clip_sample=False, **SD), {})}


class Constant:
    """A model that costs (almost) nothing: its output does not depend on the input."""

    def __call__(self, x, t, **_):
        return torch.zeros_like(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1x4x64x64", "2x4x128x128"], help="latent shapes B x C x H x W")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--parallel", type=int, nargs="+", default=[4])
    p.add_argument("--modes", nargs="+", default=["aggressive", "conservative"])
    p.add_argument("--repeats", type=int, default=5, help="timed requests (median reported)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="latent dtype (default float16 on GPU, float32 on CPU)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    from driffusion_rt import Sampler
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    if not cuda:
        torch.set_num_threads(1)
    rows = []
    for size in args.sizes:
        shape = tuple(int(v) for v in size.split("x"))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        for name, (sched, kw) in schedulers().items():
            sampler = Sampler(Constant(), cuda_graphs=False)
            for mode in args.modes:
                for n in args.parallel:
                    run = lambda: sampler(sched, x, steps=args.steps, mode=mode, parallel=n,  # noqa: E731
                                          generator=torch.Generator().manual_seed(1), **kw)
                    run()  # warm-up: trajectory, tables, buffers, kernel compilation
                    outs = [run() for _ in range(args.repeats)]
                    rounds = len(outs[0].plan.rounds)
                    per = {ph: statistics.median(o.stats.phases[ph] for o in outs) / rounds * 1e3
                           for ph in ("draft", "refine")}
                    rows.append(dict(size=size, scheduler=name, mode=mode, parallel=n, rounds=rounds,
                                     draft_ms=per["draft"], refine_ms=per["refine"],
                                     round_ms=per["draft"] + per["refine"]))
                    print(f"{size:>12} {name:>12} {mode:>12} n={n}: draft {per['draft']:.3f} ms, refine "
                          f"{per['refine']:.3f} ms per round", flush=True)
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["scheduler"] == "DDIM" and b["mode"] == r["mode"]
                    and b["parallel"] == r["parallel"])
        r["vs_ddim"] = r["round_ms"] / base["round_ms"]
    lines = ["| latent | scheduler | mode | n | draft ms/round | refine ms/round | draft + refine vs DDIM |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['scheduler']} | {r['mode']} | {r['parallel']} | {r['draft_ms']:.3f} | "
              f"{r['refine_ms']:.3f} | {r['vs_ddim']:.2f}x |" for r in rows]
    where = torch.cuda.get_device_name(0) if cuda else f"{platform.machine()} CPU, 1 thread, torch fallback"
    lines += ["", f"{where}; {str(dtype).replace('torch.', '')}; S = {args.steps}; median of {args.repeats} "
                  f"requests; a model that costs nothing; the draft phase includes the round's noise draws."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rounds.json"), "w") as f:
        json.dump({"device": where, "dtype": str(dtype), "args": vars(args), "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "rounds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
