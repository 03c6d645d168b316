"""Latency scaling of the runtime against the plan's ideal, under torchrun (one rank per device or CPU process).

    python perf/bench_latency.py --model fixed --modes aggressive conservative --parallel 2 4 --out DIR
    python perf/bench_latency.py --model unet --parallel 2 4 --ranks 1     # one device: a round's drafts batched

For each model and each n, one torchrun job of n ranks (or of --ranks R ranks, each evaluating ceil(n / R) drafts
of a round as one batched call; R = 1 is the local evaluator, draft-and-refine on a single device) runs every mode:
warm-up, then --repeats timed requests. The sequential baseline is mode=sequential on one rank. Reported per
(model, mode, n): median latency and spread, speedup over sequential, the plan's ideal speedup, efficiency = speedup / ideal, the per-round time of each phase
(draft, model, comm, refine) and the runtime overhead per serial round (wall time minus model time), next to
its floor on a multi-rank job: one all-gather of a rank's chunk after a --model-cost sleep, timed in the same job. On GPUs it
also samples NVML memory/utilisation/power per rank and reports the extra device memory over sequential.
Writes latency.json, latency.csv and latency.png (latency vs n with the ideal 1/n and 2/(n+1) curves) to --out.

Layouts: --cfg-parallel 1 2 and --ulysses 1 2 4 sweep guidance pairs and sequence groups (a job runs draft ranks x
cfg x ulysses ranks). The fixed-cost model's cost has a sequence axis: split over s ranks, each rank's per-row cost
is divided by s and every call adds --sequence-comm seconds (the attention exchanges), so layouts can be timed on
CPUs; a real transformer (a pipeline directory with a context-parallel plan) splits for real.

    python perf/bench_latency.py --layouts 8 --steps 28                    # modeled, no job: every layout of 8 GPUs
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MODELS = ("fixed", "unet", "digits")
MODES = ("sequential", "aggressive", "conservative", "picard", "parasolver")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["fixed"],
                   help=f"models: {', '.join(MODELS)} (fixed: --model-cost seconds per call, sleeping; unet: a small "
                        "random diffusers UNet at 4x64x64, ~80 ms per call on one CPU thread; digits: the embedded default model), or a diffusers "
                        "pipeline directory / hub id (GPU machines)")
    p.add_argument("--modes", nargs="+", default=["sequential", "aggressive", "conservative"], choices=MODES,
                   help="sampling modes to time (sequential is always timed on one rank as the baseline)")
    p.add_argument("--parallel", nargs="+", type=int, default=None,
                   help="n values, model evaluations per parallel round (default 1 2 4 8; without --ranks capped "
                        "by visible GPUs, or by CPU cores)")
    p.add_argument("--ranks", type=int, default=None,
                   help="ranks per job (default: n, one rank per draft); fewer ranks than n batch a round's drafts, "
                        "--ranks 1 measures single-device draft-and-refine with the local evaluator")
    p.add_argument("--steps", type=int, default=50, help="sampling steps S")
    p.add_argument("--repeats", type=int, default=5, help="timed requests per (model, mode, n)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (buffers, graphs, compilation)")
    p.add_argument("--model-cost", type=float, default=0.04, help="seconds per call of the fixed-cost model")
    p.add_argument("--model-cost-per-row", type=float, default=0.0,
                   help="fixed-cost model: seconds more per batch row of a denoiser call (a compute-bound model's "
                        "cost grows with its batch: in-rank guidance doubles it)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="fixed-cost model: a guided model (uncond and cond rows as one doubled call) with this scale")
    p.add_argument("--cfg-parallel", nargs="+", type=int, default=[1], choices=(1, 2),
                   help="guidance-parallel degrees to sweep: a job runs cfg x (draft ranks) ranks; 2 needs a guided "
                        "model (e.g. --model fixed --guidance 5)")
    p.add_argument("--ulysses", nargs="+", type=int, default=[1],
                   help="sequence degrees to sweep: a job runs draft ranks x cfg x ulysses ranks (the fixed-cost model "
                        "models the split, see --sequence-comm)")
    p.add_argument("--sequence-comm", type=float, default=0.0,
                   help="fixed-cost model: seconds per call of a split call's exchanges (added when ulysses > 1)")
    p.add_argument("--layouts", type=int, default=None, metavar="GPUS",
                   help="print the modeled latency of every (draft, cfg, ulysses) layout of GPUS devices for aggressive "
                        "sampling of --steps steps, a call costing --model-cost-per-row per row (1 unless given) over "
                        "the sequence degree plus --sequence-comm when split (--guidance > 0: a guided model), and "
                        "exit; no job runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--drafts", default="jump", choices=("jump", "extrapolate"), help="draft rule")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one torchrun job is abandoned")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for latency.json/.csv/.png")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run as a torchrun rank
    p.add_argument("--worker-parallel", type=int, default=None, help=argparse.SUPPRESS)  # internal: n of the job
    p.add_argument("--worker-cfg", type=int, default=1, help=argparse.SUPPRESS)  # internal: cfg degree of the job
    p.add_argument("--worker-ulysses", type=int, default=1, help=argparse.SUPPRESS)  # internal: sequence degree
    return p


def default_parallel():
    import torch
    cap = torch.cuda.device_count() or os.cpu_count() or 1
    return [n for n in (1, 2, 4, 8) if n <= cap]


# ----------------------------------------------------------------------------------------------- worker


def build_model(name, args, device):
    """(model, scheduler, latent, model_kwargs) on this rank; every rank builds the same replica."""
    import torch
    from diffusers import DDIMScheduler
    if name == "fixed":
        from driffusion_rt.fixed_cost import FixedCostModel
        model = FixedCostModel(args.model_cost, args.model_cost_per_row, args.guidance, args.sequence_comm)
        return model, DDIMScheduler(clip_sample=False), torch.randn(1, 4, 64, 64), None
    if name == "unet":
        from diffusers import UNet2DModel
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                           layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                           norm_num_groups=8).eval().to(device)
        return (lambda x, t: unet(x, t).sample), DDIMScheduler(clip_sample=False), torch.randn(1, 4, 64, 64), None
    from driffusion_rt import requests, services  # digits, or a diffusers pipeline: its default request
    service = services.load_service(name, device)
    spec = {"prompt": "0123456789" if name == "digits" else "an astronaut riding a horse on the moon",
            "steps": args.steps}
    req = service.prepare(service.admit(requests.parse(spec, service)))
    return service.model, req.trajectory, req.latents, req.model_kwargs


def worker(args):
    import torch
    import torch.distributed as dist
    from gpu_monitor import GpuMonitor

    from driffusion_rt.distributed import maybe_init_dist
    from driffusion_rt.layout import parallelize
    torch.set_num_threads(args.threads)
    info = maybe_init_dist(timeout_s=120)
    rank, world = (info.rank, info.world) if info else (0, 1)
    device = info.device if info else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    name = args.model[0]
    model, sched, x, kw = build_model(name, args, device)
    x = x.to(device)
    sampler = parallelize(model, cfg=args.worker_cfg, info=info, ulysses=args.worker_ulysses)
    n = args.worker_parallel or sampler.layout.draft
    modes = ["sequential"] if n == 1 else []
    modes += [m for m in args.modes if m != "sequential"]
    monitor = GpuMonitor(device)
    rows = []
    with torch.no_grad():
        for mode in modes:
            extra = {"drafts": args.drafts} if mode in ("aggressive", "conservative") else {}
            run = lambda: sampler(sched, x, steps=args.steps, mode=mode, parallel=n, model_kwargs=kw, **extra)
            for _ in range(args.warmup):
                run()
            monitor.reset_peak()
            times, outs = [], []
            with monitor:
                for _ in range(args.repeats):
                    if info:
                        dist.barrier()
                    t0 = time.perf_counter()
                    out = run()
                    if x.is_cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    outs.append(out)
            st = outs[-1].stats
            rounds = max(len(outs[-1].plan.rounds) if outs[-1].plan else st.serial_rounds, 1)
            phases = {k: statistics.mean(o.stats.phases[k] for o in outs) for k in st.phases}
            row = dict(model=name, mode=mode, parallel=n, ranks=world, cfg=sampler.layout.cfg,
                       ulysses=sampler.layout.ulysses, steps=args.steps,
                       repeats=args.repeats,
                       latency_s=statistics.median(times), latency_min_s=min(times), latency_max_s=max(times),
                       serial_rounds=st.serial_rounds, model_evals=st.model_evals, ideal_speedup=st.ideal_speedup,
                       rounds=rounds, **{f"{k}_ms_per_round": v / rounds * 1e3 for k, v in phases.items()},
                       overhead_ms_per_serial_round=(statistics.mean(times) - phases["model"])
                       / max(st.serial_rounds, 1) * 1e3,
                       device=str(device), backend=info.backend if info else "local", **monitor.summary())
            gathered = [None] * world
            if info:
                dist.all_gather_object(gathered, row)
            else:
                gathered = [row]
            if rank == 0:
                row["per_rank_gpu"] = [{k: v for k, v in g.items() if k.startswith("gpu_")} for g in gathered]
                rows.append(row)
    if info and not sampler.layout.splits:
        # the floor the overhead column is compared with: one all-gather of a rank's chunk, timed in this job
        from bench_collectives import time_collectives
        chunk = (x.shape[0] * -(-n // world), *x.shape[1:])
        floor = time_collectives(info, chunk, args.model_cost, iters=20)["all_gather"]["median_ms"]
        for row in rows:
            row["all_gather_floor_ms"] = floor
    if rank == 0:
        with open(args.worker, "w") as f:
            json.dump(rows, f)
    from driffusion_rt.distributed import teardown
    teardown(info)  # leave together, and join the backend's threads before the interpreter exits


# ----------------------------------------------------------------------------------------------- driver


def launch(model, n, ranks, args, result, cfg=1, ulysses=1):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           "--worker", result, "--worker-parallel", str(n), "--worker-cfg", str(cfg),
           "--worker-ulysses", str(ulysses), "--sequence-comm", str(args.sequence_comm), "--model", model,
           "--modes", *args.modes, "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--model-cost", str(args.model_cost),
           "--model-cost-per-row", str(args.model_cost_per_row), "--guidance", str(args.guidance),
           "--threads", str(args.threads), "--drafts", args.drafts]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark job ({model}, n={n}, {ranks} ranks) failed:\n{r.stderr[-4000:]}")
    with open(result) as f:
        return json.load(f)


def table(rows) -> str:
    cols = [("model", "{}"), ("mode", "{}"), ("parallel", "{}"), ("ranks", "{}"), ("cfg", "{}"), ("ulysses", "{}"),
            ("latency_s", "{:.3f}"),
            ("speedup", "{:.2f}x"), ("ideal_speedup", "{:.2f}x"), ("efficiency", "{:.3f}"),
            ("overhead_ms_per_serial_round", "{:.2f}"), ("all_gather_floor_ms", "{:.2f}"),
            ("comm_ms_per_round", "{:.2f}"), ("draft_ms_per_round", "{:.3f}"), ("refine_ms_per_round", "{:.3f}")]
    head = ["model", "mode", "n", "ranks", "cfg", "ulysses", "latency s (median)", "speedup", "ideal", "efficiency",
            "overhead ms/serial round", "one all-gather ms (floor)", "comm ms/round", "draft ms/round", "refine ms/round"]
    if any("extra_device_mb" in r for r in rows):
        cols += [("extra_device_mb", "{:+.0f}"), ("gpu_util_mean_pct", "{:.0f}")]
        head += ["extra device MB vs sequential", "GPU util %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[c]) if c in r else "-" for c, f in cols) + " |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        seq = next(r["latency_s"] for r in mine if r["mode"] == "sequential")
        ns = sorted({r["parallel"] for r in mine})
        ax.plot(ns, [seq / n for n in ns], "k--", lw=1, label="ideal 1/n")
        ax.plot(ns, [seq * 2 / (n + 1) for n in ns], "k:", lw=1, label="ideal 2/(n+1)")
        for mode in sorted({r["mode"] for r in mine} - {"sequential"}):
            pts = sorted((r["parallel"], r["latency_s"]) for r in mine if r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode)
        ax.axhline(seq, color="gray", lw=0.8, label="sequential")
        one_rank = all(r["ranks"] == 1 for r in mine)
        ax.set(title=f"{model}" + (" (one rank: drafts batched)" if one_rank else ""),
               xlabel="n" if one_rank else "n (ranks)", ylabel="latency (s)", xticks=ns)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def modeled_layouts(gpus: int, steps: int, guided: bool, per_row: float, comm: float) -> list:
    """Every layout of `gpus` devices as draft ranks x cfg x ulysses (powers of two), modeled: aggressive sampling
    with n = draft ranks (one draft per rank, batch 1) takes the plan's serial rounds, each one call costing
    per_row x rows / ulysses (+ comm when split); rows = 2 for a guided model without a guidance pair.
    The round's all-gather and a pair's exchange (a latent each) are left out. Speedup: over sequential sampling
    on one device."""
    from driffusion_rt.plan import make_plan

    def call(cfg, seq):
        rows = 2 if guided and cfg == 1 else 1
        return per_row * rows / seq + (comm if seq > 1 else 0.0)

    base = steps * call(1, 1)
    rows = []
    for cfg in ((1, 2) if guided else (1,)):
        seq = 1
        while seq * cfg <= gpus:
            draft = gpus // (seq * cfg)
            if draft * seq * cfg == gpus:
                serial = make_plan("aggressive" if draft > 1 else "sequential", steps, draft).serial_rounds
                latency = serial * call(cfg, seq)
                rows.append(dict(gpus=gpus, draft=draft, cfg=cfg, ulysses=seq, serial_rounds=serial,
                                 call=call(cfg, seq), latency=latency, speedup=base / latency))
            seq *= 2
    return sorted(rows, key=lambda r: r["latency"])


def layouts_table(rows) -> str:
    lines = ["| GPUs | draft ranks (n) | cfg | ulysses | serial rounds | one call | latency | speedup (modeled) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['draft']} | {r['cfg']} | {r['ulysses']} | {r['serial_rounds']} | "
                     f"{r['call']:.3f} | {r['latency']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.worker:
        return worker(args)
    if args.layouts is not None:
        if args.layouts < 1:
            parser().error(f"--layouts must be >= 1, got {args.layouts}")
        rows = modeled_layouts(args.layouts, args.steps, args.guidance > 0, args.model_cost_per_row or 1.0,
                               args.sequence_comm)
        print(layouts_table(rows))
        return 0
    for name, v in (("steps", args.steps), ("repeats", args.repeats), ("threads", args.threads),
                    ("ranks", args.ranks)):
        if v is not None and v < 1:
            parser().error(f"--{name} must be >= 1, got {v}")
    ns = args.parallel or (default_parallel() if args.ranks is None else [1, 2, 4, 8])
    if any(n < 1 for n in ns):
        parser().error(f"--parallel values must be >= 1, got {ns}")
    ns = sorted(set([1] + ns))  # n = 1 carries the sequential baseline
    os.makedirs(args.out, exist_ok=True)
    import torch
    if not torch.cuda.is_available():
        print("no GPU: ranks are CPU processes on gloo; NVML memory/utilisation/power are not sampled")
    rows = []
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model:
            for n in ns:
                for cfg in sorted(set(args.cfg_parallel)) if n > 1 or 2 in args.cfg_parallel else [1]:
                    for seq in sorted(set(args.ulysses)) if n > 1 or max(args.ulysses) > 1 else [1]:
                        ranks = (n if args.ranks is None else min(args.ranks, n)) * cfg * seq
                        if not torch.cuda.is_available() and model != "fixed" and ranks > cores:
                            # a compute-bound model on more CPU ranks than cores measures oversubscription
                            print(f"[bench] {model}: skipping {ranks} ranks > {cores} CPU cores (only the fixed-cost "
                                  f"model sleeps)")
                            continue
                        print(f"[bench] {model}: n={n} on {ranks} rank(s), cfg {cfg}, ulysses {seq}, modes "
                              f"{' '.join(args.modes)} ...", flush=True)
                        rows += launch(model, n, ranks, args, os.path.join(tmp, f"{model}-{n}-{cfg}-{seq}.json"), cfg,
                                       seq)
    for model in args.model:
        seq = next(r for r in rows if r["model"] == model and r["mode"] == "sequential" and r["cfg"] == 1
                   and r["ulysses"] == 1)
        for r in rows:
            if r["model"] == model:
                r["speedup"] = seq["latency_s"] / r["latency_s"]
                r["efficiency"] = r["speedup"] / r["ideal_speedup"]
                if "gpu_peak_allocated_mb" in seq:  # the paper's "extra VRAM": parallel over sequential, worst rank
                    peak = max(g.get("gpu_peak_allocated_mb", 0) for g in r["per_rank_gpu"])
                    r["extra_device_mb"] = peak - seq["gpu_peak_allocated_mb"]
    rows = [r for r in rows if r["mode"] in args.modes or r["mode"] == "sequential"]
    rows = [r for r in rows if not (r["parallel"] == 1 and r["mode"] != "sequential" and 1 not in (args.parallel or [1]))]
    text = table(rows)
    print(text)
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump({"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
                   "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "latency.csv"), "w", newline="") as f:
        flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
        w = csv.DictWriter(f, fieldnames=sorted({k for r in flat for k in r}))
        w.writeheader()
        w.writerows(flat)
    with open(os.path.join(args.out, "latency.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "latency.png"))
    print(f"wrote {args.out}/latency.json, latency.csv, latency.md, latency.png")
    return 0


def machine() -> dict:
    import platform

    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpus": gpus,
            "torch": torch.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
