"""Sample with draft-and-refine parallelism: `python -m driffusion_rt.generate`, or one rank per device with
`torchrun --nproc_per_node=N -m driffusion_rt.generate`.

With no --model it samples the small digits model shipped in the package (no network, no GPU) and writes one PNG
grid. --model also takes a diffusers pipeline directory or hub id (SD 1.5 / 2.1, SDXL, SD3, Flux; video: Wan 2.1 /
2.2, HunyuanVideo 1.5, LTX-Video, written as MP4), or the built-in test models gmm (analytic Gaussian mixture) and
fixed (a model costing --model-cost seconds per call). Image pipelines also take an input image (img2img,
inpainting with --mask-image), ControlNets with control images, and LoRA weights.
Everything is checked before any model loads (on rank 0 under torchrun; bad input exits with status 2 and one
message). Every rank then loads its model replica once; rank 0 prints progress and the measured-versus-ideal table
and writes the outputs, all of them or none, only when the run succeeds. Flags, names and statuses: docs/cli.md.
"""
import hashlib
import json
import os
import sys
import time
import traceback

import torch

from . import cli, distributed, layout
from .distributed import CollectiveTimeout
from .evaluator import ModelOutputError
from .layout import parallelize
from .model_ref import BUILTIN, inspect_model
from .options import ALL_MODES
from .outputs import check_output_dir, mp4_bytes, write_all
from .pipelines.images import open_image
from .requests import MODEL_KEYS, SAMPLING_KEYS, Request, RequestError, parse
from .rounds import DRAFT_RULES
from .services import check_sequence, load_service
from .strength import check_strength

PROG = "python -m driffusion_rt.generate"


def parser():
    p = cli.parser(PROG, __doc__)
    cli.add_model_flags(p)
    p.add_argument("--prompt", default=None,
                   help="digits: the digits to draw (default 0123456789); pipelines: the text prompt")
    p.add_argument("--negative-prompt", default=None, help="pipelines: what to steer away from (guidance on)")
    p.add_argument("--mode", default="aggressive", choices=ALL_MODES,
                   help="sequential: the scheduler's own loop; aggressive (the default): ~1/n latency; conservative: "
                        "~2/(n+1); picard / parasolver: iterate to --tolerance (exact at 0, more model evaluations); "
                        "adaptive: the fewest rounds that keep the sample within --tolerance of the sequential one")
    p.add_argument("--parallel", type=int, default=None,
                   help="n, model evaluations per parallel round (default: the number of draft ranks, 1 outside "
                        "torchrun)")
    p.add_argument("--drafts", default="jump", choices=DRAFT_RULES,
                   help="jump (the default): the paper's drafts; extrapolate: drafts from the anchor output "
                        "extrapolated with the previous output (same model calls; falls back to jump for stochastic "
                        "steps)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps S (default: the pipeline's own: 50; SD3 and Flux.1 pipelines 28)")
    p.add_argument("--scheduler", default=None,
                   help="a scheduler short name the model takes (docs/schedulers.md): ddim, dpm++2m-karras, unipc, "
                        "euler-a, ... for digits and SD-family pipelines; flow, flow-unipc, flow-dpm++2m for "
                        "flow-matching ones; ddim, ddpm, euler or flow for gmm and fixed; default: the model's own")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's: digits 1.25, SD 7.5, SDXL 5, SD3 7, "
                        "Z-Image 5 (on above 0), Qwen-Image 4 (its true_cfg_scale, on with --negative-prompt); "
                        "Flux.1 3.5 and Flux.2 4 as their guidance embedding)")
    p.add_argument("--height", type=int, default=None, help="pipelines: image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pipelines: image width in pixels (default: the model's)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="video pipelines: frames per video, as the VAE takes them (Wan and HunyuanVideo 1.5: 4k+1, "
                        "LTX: 8k+1; default: the model's); the output is an MP4")
    p.add_argument("--fps", type=int, default=None,
                   help="video pipelines: frames per second of the MP4 (default: the model's, e.g. Wan 2.1 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of stochastic steps (default 0)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images (videos) per request (default 1; digits: one grid of the prompt's digits per image; "
                        "gmm and fixed: 4 latents)")
    p.add_argument("--out", default=".",
                   help="directory for the images and the run's JSON (created if missing; default: the current "
                        "directory); file names in docs/cli.md")
    im = p.add_argument_group("image inputs (diffusers pipelines)")
    im.add_argument("--image", default=None, metavar="PATH",
                    help="img2img: start from this image (PNG / JPEG), noised to --strength; SD / SDXL / Z-Image keep "
                         "its size. Qwen-Image-Edit: the image to edit (required)")
    im.add_argument("--strength", type=float, default=None, metavar="S",
                    help="fraction of the schedule run on --image, in (0, 1] (default: the pipeline's: SD 0.8, "
                         "SDXL 0.3, SD3 / Flux / Qwen-Image / Z-Image 0.6; inpainting SD 1.0, SDXL 0.9999)")
    im.add_argument("--mask-image", default=None, metavar="PATH",
                    help="inpainting (SD / SDXL): repaint where this mask is white, keep --image where it is black")
    im.add_argument("--control-image", action="append", default=[], metavar="PATH",
                    help="the control image of each --controlnet, in order")
    im.add_argument("--controlnet-scale", dest="controlnet_conditioning_scale", type=float, action="append",
                    default=None, metavar="S",
                    help="conditioning scale of each --controlnet (default 1; one value for all)")
    it = p.add_argument_group("picard / parasolver / adaptive")
    it.add_argument("--subintervals", type=int, default=None, help="N subintervals (parasolver; default steps // 2)")
    it.add_argument("--preconditioning", type=int, default=None,
                    help="M subintervals solved sequentially first (default 2; picard 0)")
    it.add_argument("--window", type=int, default=None, help="p boundaries solved in parallel (default --parallel)")
    it.add_argument("--tolerance", type=float, default=None,
                    help="picard / parasolver: delta of the stopping rule (default 0.05); adaptive: the allowed "
                         "relative deviation of the sample from the sequential one (default 0.001); 0: exact")
    cli.add_runtime_flags(p)
    rt = p.add_argument_group("command line")
    rt.add_argument("--warmup", type=int, default=1,
                    help="untimed requests before the measured one (compilation, buffers, CUDA-graph capture; "
                         "default 1)")
    rt.add_argument("--show-plan", action="store_true", help="print every round of the plan")
    cli.add_limit_flags(p)
    return p


def check_args(args):
    """Checks of the flags that are not request fields; returns the request limits. Raises ValueError."""
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    check_image_args(args)
    return cli.check_shared_args(args)


def check_image_args(args):
    """The image-input flags among themselves (no file is read here: preflight does that on rank 0)."""
    used = [f for f, v in (("--image", args.image), ("--mask-image", args.mask_image),
                           ("--strength", args.strength is not None), ("--controlnet", args.controlnet),
                           ("--control-image", args.control_image),
                           ("--controlnet-scale", args.controlnet_conditioning_scale), ("--lora", args.lora)) if v]
    if not used:
        return
    if args.model in BUILTIN:
        raise ValueError(f"{', '.join(used)} apply to diffusers pipelines, not --model {args.model}")
    if args.strength is not None:
        check_strength(args.strength)
    if args.mask_image and not args.image:
        raise ValueError("--mask-image needs --image (the picture to inpaint)")
    if args.strength is not None and not args.image:
        raise ValueError("--strength applies with --image")
    if len(args.control_image) != len(args.controlnet):
        raise ValueError(f"{len(args.control_image)} --control-image for {len(args.controlnet)} --controlnet: pass "
                         f"one control image per ControlNet")
    if args.controlnet and args.image:
        raise ValueError("--controlnet runs ControlNet text-to-image; it does not combine with --image")
    scales = args.controlnet_conditioning_scale
    if scales and (not args.controlnet or len(scales) not in (1, len(args.controlnet))):
        raise ValueError("--controlnet-scale takes one value, or one per --controlnet")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def request_spec(args) -> dict:
    """The CLI flags as a request (requests.py): the same request gives the same image through the server. Image
    files are read as bytes."""
    spec = {k: getattr(args, k, None) for k in MODEL_KEYS + SAMPLING_KEYS}
    spec["image"], spec["mask_image"] = (_read(p) if p else None for p in (args.image, args.mask_image))
    control = [_read(p) for p in args.control_image]
    spec["control_image"] = (control[0] if len(control) == 1 else control) or None
    scales = spec["controlnet_conditioning_scale"]
    spec["controlnet_conditioning_scale"] = scales[0] if scales and len(scales) == 1 else scales
    return {k: v for k, v in spec.items() if v is not None}


def draft_ranks(args, world: int) -> int:
    return world // (args.ulysses * args.ring * (int(args.cfg_parallel) if args.cfg_parallel != "auto" else 1))


def output_stem(args, ref, request: Request, world: int) -> str:
    """<model>-<mode>-n<n>-s<steps>-<scheduler>[-<drafts>]-<dtype>-seed<seed>-<hash>: readable settings, and a hash
    of every setting (prompt, guidance, size, input images' digests, LoRAs, ControlNets, ...), so runs with
    different settings never share a name."""
    options, resolved = request.options, request.resolved
    n = options.n(draft_ranks(args, world))
    adapters = {k: v for k, v in (("loras", ref.loras), ("controlnets", ref.controlnets)) if v}
    split = {"ulysses": args.ulysses, "ring": args.ring} if args.ulysses * args.ring > 1 else {}
    settings = {"model": args.model, "dtype": args.dtype, **options.fields(), "parallel": n, **adapters,
                "cfg_parallel": args.cfg_parallel, **split, **{k: v for k, v in resolved.items() if k != "labels"}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    drafts = f"-{options.drafts}" if options.planned else ""
    return (f"{ref.name}-{options.mode}-n{n}-s{resolved['steps']}-{resolved['scheduler']}{drafts}-{args.dtype}"
            f"-seed{resolved['seed']}-{digest}")


def output_names(ref, resolved, stem: str) -> list:
    """The run's files: <stem>.png (one image; .mp4 for a video), <stem>-<i>.png (several), <stem>.pt (no images),
    and <stem>.json."""
    ext = "mp4" if ref.rules is not None and ref.rules.video else "png"
    if ref.kind in ("gmm", "fixed"):
        files = [f"{stem}.pt"]
    elif resolved["num_images"] == 1:
        files = [f"{stem}.{ext}"]
    else:
        files = [f"{stem}-{i}.{ext}" for i in range(resolved["num_images"])]
    return files + [f"{stem}.json"]


def preflight(args, limits, world: int) -> dict:
    """Everything that can be checked before a model loads (rank 0): the model reference, the request with every
    resolved value, the plan's parameters, and that the outputs can be written. Raises ValueError."""
    ref = inspect_model(args.model, args.lora, args.controlnet)
    for flag, paths in (("--image", [args.image]), ("--mask-image", [args.mask_image]),
                        ("--control-image", args.control_image)):
        for path in paths:
            if path is not None:
                open_image(path, flag)  # readable, naming the flag (the request's checks name its fields)
    layout.check_world(args.cfg_parallel, world, args.ulysses, args.ring)
    request = parse(request_spec(args), ref, limits)
    ref.check_sequence(request.resolved, args.ulysses, args.ring)
    request.options.check(request.resolved["steps"], request.options.n(draft_ranks(args, world)))
    stem = output_stem(args, ref, request, world)
    names = output_names(ref, request.resolved, stem)
    out = check_output_dir(args.out, names)
    return dict(ref=ref, request=request, stem=stem, files=[os.path.join(out, f) for f in names])


def admit(service, request: Request, args) -> Request:
    """What only the loaded model can check (rank 0): the service's rules, and the request's token counts against
    the sequence split."""
    request = service.admit(request)
    check_sequence(service, request, args.ulysses, args.ring)
    return request


def _agreed(info, rank: int, check):
    """check() on rank 0; its ValueError is bad input on every rank (one message, status 2)."""
    verdict, value = None, None
    if rank == 0:
        try:
            value = check()
        except ValueError as e:
            verdict = str(e)
    if not distributed.rank0_agrees(info, verdict is None):
        cli.bad_input(verdict or "", info)
    return value


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        limits = check_args(args)
        info = distributed.maybe_init_dist(args.timeout, args.device, args.load_timeout)
    except ValueError as e:  # every rank sees the same flags and devices, so every rank stops here
        cli.bad_input(str(e))
    rank, world = (info.rank, info.world) if info else (0, 1)
    try:
        plan = _agreed(info, rank, lambda: preflight(args, limits, world))  # one verdict, before any model loads
        device = info.device if info else distributed.pick_device(args.device)
        t0 = time.perf_counter()
        try:  # LoRA weights or a ControlNet that do not load: bad input, the same on every rank
            service = load_service(args.model, device, getattr(torch, args.dtype), args.model_cost,
                                   loras=args.lora, controlnets=args.controlnet, cost_per_row=args.model_cost_per_row)
        except RequestError as e:
            cli.bad_input(str(e), info)
        distributed.ready(info)  # every rank loaded: from here a silent rank fails the job after --timeout
        load_s = time.perf_counter() - t0
        # what only the loaded model can tell (a video family's frame rule, control images' sizes), on rank 0
        request = _agreed(info, rank, lambda: admit(service, plan["request"], args))
        request = Request.from_wire(distributed.broadcast_bytes(info, request.to_wire() if rank == 0 else None))
        try:  # what the request's preparation finds (whether the runtime can run the scheduler, guidance) and what
            first = service.prepare(request)  # the layout needs of the model: the same verdict on every rank
            cfg = layout.resolve(args.cfg_parallel, world, layout.guided(service.model, first.model_kwargs),
                                 args.ulysses, args.ring)
            sampler = parallelize(service.model, getattr(service, "pipe", None), cfg=cfg, info=info,
                                  cuda_graphs=not args.no_cuda_graphs, ulysses=args.ulysses, ring=args.ring)
        except ValueError as e:
            cli.bad_input(str(e), info)
        for r in range(args.warmup + 1):
            prepared = first if r == 0 else service.prepare(request)
            with torch.no_grad():
                out = sampler.apply(prepared, request.options, progress=rank == 0 and r == args.warmup)
        status = 0
        if rank == 0:
            print_summary(args, info, service, out, load_s, sampler.layout)
            try:
                files = write_outputs(args, info, service, out, request, prepared, load_s, plan, sampler.layout)
                print("wrote " + ", ".join(files))
            except OSError as e:
                print(f"driffusion_rt: error: could not write the outputs to {args.out!r} (none were kept): {e}",
                      file=sys.stderr, flush=True)
                status = 1
        distributed.teardown(info)
        return status
    except KeyboardInterrupt:
        if rank == 0:
            print("driffusion_rt: interrupted; no output written", file=sys.stderr, flush=True)
        distributed.exit_now(130)
    except CollectiveTimeout as e:  # another rank is gone: this rank says so once and leaves the broken group
        print(f"driffusion_rt: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        distributed.exit_now(1)
    except Exception as e:
        if rank == 0 or not isinstance(e, ModelOutputError):  # a model output error is the same on every rank
            print(f"driffusion_rt: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if not isinstance(e, ValueError):  # a bug, not bad data: keep the traceback for the report
            traceback.print_exc()
        distributed.exit_now(1)


def table(plan, stats) -> dict:
    """The measured-versus-ideal numbers of a run (plan is None for the iterative and adaptive modes)."""
    per_call = stats.phases.get("model", 0.0) / max(stats.serial_rounds, 1)
    ideal = (plan.serial_rounds if plan else stats.serial_rounds) * per_call
    return {"mode": stats.mode, "steps": stats.steps, "parallel": stats.parallel,
            "serial_rounds_plan": plan.serial_rounds if plan else None, "serial_rounds": stats.serial_rounds,
            "model_evals_plan": plan.model_evals if plan else None, "model_evals": stats.model_evals,
            "iterations": getattr(stats, "iterations", None), "accepted": getattr(stats, "accepted", None),
            "estimate": getattr(stats, "estimate", None), "ideal_speedup": stats.ideal_speedup,
            "latency_s": stats.wall_time, "ideal_latency_s": ideal,
            "efficiency": ideal / stats.wall_time if stats.wall_time else None, "phases_s": dict(stats.phases)}


def report(plan, stats) -> str:
    """The measured-versus-ideal table printed at the end of a run."""
    t = table(plan, stats)
    rows = [("mode", t["mode"]), ("steps S", t["steps"]), ("parallel n", t["parallel"])]
    if plan:
        rows += [("serial model rounds (plan / measured)", f"{t['serial_rounds_plan']} / {t['serial_rounds']}"),
                 ("model evaluations (plan / measured)", f"{t['model_evals_plan']} / {t['model_evals']}")]
    else:
        if t["accepted"] is not None:
            rows += [("accepted states per round", " ".join(map(str, t["accepted"]))),
                     ("estimated relative deviation", f"{t['estimate']:.2e}")]
        else:
            rows += [("iterations", t["iterations"])]
        rows += [("serial model rounds (measured)", t["serial_rounds"]),
                 ("model evaluations (measured)", t["model_evals"])]
    rows += [("ideal speedup over sequential", f"{t['ideal_speedup']:.2f}x"),
             ("measured latency", f"{t['latency_s'] * 1e3:.1f} ms"),
             ("ideal latency (serial rounds x mean model-call time)", f"{t['ideal_latency_s'] * 1e3:.1f} ms"),
             ("efficiency (ideal / measured)", f"{t['efficiency']:.3f}" if t["efficiency"] else "-")]
    rows += [(f"  phase {k}", f"{v * 1e3:.2f} ms") for k, v in t["phases_s"].items()]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def print_summary(args, info, service, out, load_s, lay):
    if out.plan is not None:
        print(out.plan.describe() if args.show_plan else out.plan.describe().splitlines()[0])
    elif hasattr(out.stats, "accepted"):
        print(f"adaptive: tolerance {out.stats.tolerance:g}, {out.stats.serial_rounds} rounds, window trace "
              f"(anchor, points, accepted) {out.stats.trace}")
    else:
        print(f"{args.mode}: {out.stats.iterations} iterations, window trace (start, width, stride) {out.stats.trace}")
    print(f"model {service.name}, ranks {info.world if info else 1} ({info.backend if info else 'local'}), "
          f"device {out.sample.device}, load {load_s:.2f} s")
    print(f"layout: {lay.summary()}, parallel n = {out.stats.parallel}")
    print(report(out.plan, out.stats))


def write_outputs(args, info, service, out, request, prepared, load_s, plan, lay) -> list:
    """The images (or latents) and the run's JSON, all or none (rank 0)."""
    *targets, json_path = plan["files"]
    images, output_stats = service.outputs(out, request, prepared)  # videos: each a list of frames
    if images:
        if len(images) != len(targets):
            raise RuntimeError(f"{len(images)} images for {len(targets)} file names")
        if service.video:
            fps = request.resolved["fps"]
            items = [(t, lambda f, v=v: f.write(mp4_bytes(v, fps))) for t, v in zip(targets, images)]
        else:
            items = [(t, lambda f, im=im: im.save(f, format="PNG")) for t, im in zip(targets, images)]
    else:
        items = [(targets[0], lambda f: torch.save(out.cpu(), f))]
    st, options = out.stats, request.options
    run = {"model": service.name, "model_arg": args.model, "dtype": args.dtype,
           "device": str(out.sample.device), "ranks": info.world if info else 1,
           "backend": info.backend if info else "local", "request": dict(request.resolved),
           "sampling": options.fields(),
           "layout": {"cfg": lay.cfg, "draft_ranks": lay.draft, "ulysses": lay.ulysses, "ring": lay.ring,
                      "parallel": out.stats.parallel},
           "mode": st.mode, "parallel": st.parallel, "steps": st.steps, "seed": request.resolved["seed"],
           "drafts": options.drafts if options.planned else None, "load_s": load_s, "table": table(out.plan, st),
           "latency_s": st.wall_time, "serial_rounds": st.serial_rounds,
           "serial_rounds_plan": out.plan.serial_rounds if out.plan else None, "model_evals": st.model_evals,
           "ideal_speedup": st.ideal_speedup, "batch_widths": st.batch_widths,
           "files": [os.path.basename(t) for t in targets], "args": vars(args),
           **output_stats}  # video: frames, fps, the decode's seconds and memory
    items.append((json_path, lambda f: f.write(json.dumps(run, indent=2, default=str).encode())))
    return write_all(items)


if __name__ == "__main__":
    sys.exit(main())
