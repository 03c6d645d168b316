"""Sample with draft-and-refine parallelism: `python -m driffusion_rt.generate`, or one rank per device with
`torchrun --nproc_per_node=N -m driffusion_rt.generate`.

With no --model it samples the small digits model shipped in the package (no network, no GPU) and writes one PNG
grid. --model also takes a diffusers pipeline directory or hub id (SD 1.5 / 2.1, SDXL, SD3, Flux; video: Wan 2.1 /
2.2, HunyuanVideo 1.5, LTX-Video, written as MP4), or the built-in test models gmm (analytic Gaussian mixture) and
fixed (a model costing --model-cost seconds per call). Image pipelines also take an input image (img2img,
inpainting with --mask-image), ControlNets with control images, and LoRA weights.
Every rank loads its model replica once; rank 0 prints progress and the measured-versus-ideal table and writes the
outputs, atomically and only when the run succeeds.
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
from .outputs import atomic_write
from .parasolver import MODES as ITERATIVE_MODES
from .plan import MODES
from . import services, video_service
from .sampler import DRAFT_RULES, Sampler

DTYPES = ("float32", "float16", "bfloat16", "float64")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m driffusion_rt.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits",
                   help="digits (the shipped class-conditional digits model), a diffusers pipeline directory or hub "
                        "id, gmm (analytic Gaussian mixture) or fixed (a sleeping fixed-cost model)")
    p.add_argument("--prompt", default=None,
                   help="digits: the digits to draw, e.g. 0123456789 (the default); pipelines: the text prompt")
    p.add_argument("--negative-prompt", default=None, help="pipelines: what to steer away from (guidance on)")
    p.add_argument("--mode", default="aggressive", choices=MODES + ITERATIVE_MODES,
                   help="sequential: the scheduler's own loop; aggressive: ~1/n latency; conservative: ~2/(n+1); "
                        "picard / parasolver: iterate to --tolerance (exact at 0, more model evaluations)")
    p.add_argument("--parallel", type=int, default=None,
                   help="n, model evaluations per parallel round (default: the number of ranks, 1 outside torchrun)")
    p.add_argument("--drafts", default="jump", choices=DRAFT_RULES,
                   help="jump: the paper's drafts; extrapolate: drafts from the anchor output extrapolated with the "
                        "previous output (same model calls; falls back to jump for stochastic steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps S (default: 50; SD3 and Flux pipelines 28)")
    p.add_argument("--scheduler", default=None, choices=services.SCHEDULERS,
                   help="ddim, ddpm, euler (digits, gmm, SD-family pipelines) or flow (SD3, Flux); default: the "
                        "model's own")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's: digits 1.25, SD 7.5, SDXL 5, SD3 7, "
                        "Flux 3.5 as its guidance embedding)")
    p.add_argument("--height", type=int, default=None, help="pipelines: image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pipelines: image width in pixels (default: the model's)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="video pipelines: frames per video, as the VAE takes them (Wan and HunyuanVideo 1.5: 4k+1, "
                        "LTX: 8k+1; default: the model's); the output is an MP4")
    p.add_argument("--fps", type=int, default=None,
                   help="video pipelines: frames per second of the MP4 (default: the model's, e.g. Wan 2.1 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of stochastic steps")
    p.add_argument("--num-images", type=int, default=None,
                   help="images (videos) per request (default: one per prompt digit for digits, 1 for pipelines, 4 "
                        "for gmm)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model and latent dtype")
    p.add_argument("--out", default=".", help="directory for the images and the run's JSON (created if missing)")
    im = p.add_argument_group("image inputs and adapters (diffusers pipelines)")
    im.add_argument("--image", default=None, metavar="PATH",
                    help="img2img: start from this image (PNG / JPEG), noised to --strength; SD / SDXL keep its size")
    im.add_argument("--strength", type=float, default=None, metavar="S",
                    help="fraction of the schedule run on --image, in (0, 1] (default: the pipeline's: SD 0.8, "
                         "SDXL 0.3, SD3 / Flux 0.6; inpainting SD 1.0, SDXL 0.9999)")
    im.add_argument("--mask-image", default=None, metavar="PATH",
                    help="inpainting (SD / SDXL): repaint where this mask is white, keep --image where it is black")
    im.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                    help="a ControlNetModel directory (SD / SDXL; repeatable: MultiControlNet, one --control-image "
                         "each)")
    im.add_argument("--control-image", action="append", default=[], metavar="PATH",
                    help="the control image of each --controlnet, in order")
    im.add_argument("--controlnet-scale", dest="controlnet_conditioning_scale", type=float, action="append",
                    default=None, metavar="S",
                    help="conditioning scale of each --controlnet (default 1; one value for all)")
    im.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="LoRA weights (a .safetensors file or a directory) loaded with their scale, default 1 "
                         "(repeatable; SD, SDXL, SD3, Flux; needs peft)")
    it = p.add_argument_group("picard / parasolver")
    it.add_argument("--subintervals", type=int, default=None, help="N subintervals (parasolver; default steps // 2)")
    it.add_argument("--preconditioning", type=int, default=None,
                    help="M subintervals solved sequentially first (default 2; picard 0)")
    it.add_argument("--window", type=int, default=None, help="p boundaries solved in parallel (default --parallel)")
    it.add_argument("--tolerance", type=float, default=None, help="delta of the stopping rule (default 0.05)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--model-cost", type=float, default=0.04, help="seconds per call of --model fixed")
    rt.add_argument("--warmup", type=int, default=1,
                    help="untimed requests before the measured one (compilation, buffers, CUDA-graph capture)")
    rt.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help="seconds a collective may wait for the other ranks before the job fails")
    rt.add_argument("--no-cuda-graphs", action="store_true",
                    help="run the model eagerly on GPU (CUDA graphs are on by default there)")
    rt.add_argument("--show-plan", action="store_true", help="print every round of the plan")
    return p


def check_args(p, args):
    for name in ("parallel", "steps", "num_images", "height", "width", "subintervals", "window"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("warmup", "preconditioning"):
        v = getattr(args, name)
        if v is not None and v < 0:
            p.error(f"--{name} must be >= 0, got {v}")
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.model in ("gmm", "fixed", "digits") and (args.height or args.width or args.negative_prompt):
        p.error(f"--height, --width and --negative-prompt apply to diffusers pipelines, not --model {args.model}")
    for name in ("num_frames", "fps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    try:  # video flags on a model that makes images (built-in, or a pipeline directory by its model index)
        video_service.check_kind(args.model, [f"--{n.replace('_', '-')}" for n in ("num_frames", "fps")
                                              if getattr(args, n) is not None])
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    check_image_args(p, args)


def check_image_args(p, args):
    """Image inputs, ControlNets and LoRAs: everything that can be checked before the model loads."""
    used = [f for f, v in (("--image", args.image), ("--mask-image", args.mask_image),
                           ("--strength", args.strength is not None), ("--controlnet", args.controlnet),
                           ("--control-image", args.control_image),
                           ("--controlnet-scale", args.controlnet_conditioning_scale), ("--lora", args.lora)) if v]
    if not used:
        return
    if args.model in services.BUILTIN:
        p.error(f"{', '.join(used)} apply to diffusers pipelines, not --model {args.model}")
    from .pipelines.conditioning import open_image
    from .pipelines.lora import check_lora_path, parse_lora
    from .strength import check_strength
    try:
        if args.strength is not None:
            check_strength(args.strength)
        for flag, paths in (("--image", [args.image]), ("--mask-image", [args.mask_image]),
                            ("--control-image", args.control_image)):
            for path in paths:
                if path is not None:
                    open_image(path, flag)
        for spec in args.lora:
            check_lora_path(parse_lora(spec)[0])
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.mask_image and not args.image:
        p.error("--mask-image needs --image (the picture to inpaint)")
    if args.strength is not None and not args.image:
        p.error("--strength applies with --image")
    if len(args.control_image) != len(args.controlnet):
        p.error(f"{len(args.control_image)} --control-image for {len(args.controlnet)} --controlnet: pass one "
                f"control image per ControlNet")
    if args.controlnet and args.image:
        p.error("--controlnet runs ControlNet text-to-image; it does not combine with --image")
    scales = args.controlnet_conditioning_scale
    if scales and (not args.controlnet or len(scales) not in (1, len(args.controlnet))):
        p.error("--controlnet-scale takes one value, or one per --controlnet")
    for path in args.controlnet:
        if not os.path.isfile(os.path.join(path, "config.json")):
            p.error(f"--controlnet {path!r} is not a ControlNetModel directory (no config.json)")
    if args.controlnet and os.path.isfile(os.path.join(args.model, "model_index.json")):
        from .pipelines import REGISTRY, check_model_dir, family_of_class
        from .pipelines.conditioning import task_class
        try:
            family = REGISTRY[family_of_class(check_model_dir(args.model).get("_class_name"), args.model)]
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        if task_class(family, "controlnet") is None:
            p.error(f"--controlnet: ControlNet is supported for the sd and sdxl families; {args.model} is a "
                    f"{family.name} pipeline")


def report(plan, stats) -> str:
    """The measured-versus-ideal table printed at the end of a run (plan is None for the iterative modes)."""
    per_round = stats.phases.get("model", 0.0) / max(stats.serial_rounds, 1)
    ideal = (plan.serial_rounds if plan else stats.serial_rounds) * per_round
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


def request_spec(args) -> dict:
    """The CLI flags as an engine request (services.py): the same request gives the same image through both
    (image files travel as the base64 an HTTP request carries)."""
    spec = {k: getattr(args, k, None) for k in services.MODEL_KEYS + services.SAMPLING_KEYS}
    spec["image"], spec["mask_image"] = (services.encode_image_file(p) if p else None
                                         for p in (args.image, args.mask_image))
    control = [services.encode_image_file(p) for p in args.control_image]
    spec["control_image"] = (control[0] if len(control) == 1 else control) or None
    scales = spec["controlnet_conditioning_scale"]
    spec["controlnet_conditioning_scale"] = scales[0] if scales and len(scales) == 1 else scales
    return {k: v for k, v in spec.items() if v is not None}


@record
def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    info = maybe_init_dist(args.timeout)
    rank, device = (info.rank, info.device) if info else (0, torch.device("cpu"))
    try:
        t0 = time.perf_counter()
        service = services.load_service(args.model, device, getattr(torch, args.dtype), args.model_cost,
                                        loras=args.lora, controlnets=args.controlnet)
        sampler = Sampler(service.model, default_evaluator(service.model),
                          cuda_graphs=not args.no_cuda_graphs and getattr(service.model, "cuda_graphs", True))
        load_s = time.perf_counter() - t0
        spec = request_spec(args)
        options = services.sampling_options(spec)

        def run(progress):
            req = service.request(spec)
            with torch.no_grad():
                return req, sampler(req.scheduler, req.latent, steps=req.steps, generator=req.generator,
                                    model_kwargs=req.model_kwargs, progress=progress, start=req.start,
                                    blend=req.blend, **options)
        for _ in range(args.warmup):
            run(False)
        req, out = run(rank == 0)
        if rank == 0:
            if out.plan is not None:
                print(out.plan.describe() if args.show_plan else out.plan.describe().splitlines()[0])
            else:
                print(f"{args.mode}: {out.stats.iterations} iterations, window trace (start, width, stride) "
                      f"{out.stats.trace}")
            print(f"model {service.name}, ranks {info.world if info else 1} ({info.backend if info else 'local'}), "
                  f"load {load_s:.2f} s")
            print(report(out.plan, out.stats))
            os.makedirs(args.out, exist_ok=True)
            stem = f"{service.name}-{args.mode}-n{out.stats.parallel}-s{out.stats.steps}-seed{args.seed}"
            files = save(service, out, req, args.out, stem)
            files.append(write_run(args, info, service.name, out, load_s, stem, files,
                                   getattr(req, "output_stats", None)))
            print("wrote " + ", ".join(files))
    except (ValueError, FileNotFoundError) as e:  # bad input: every rank sees the same, so every rank stops
        if rank == 0:
            print(f"driffusion_rt: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as e:
        print(f"driffusion_rt: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    if info is not None:
        dist.destroy_process_group()
    return 0


def save(service, out, req, out_dir, stem) -> list:
    """PNG images (one: <stem>.png, several: <stem>-<i>.png), MP4s for video pipelines, or the latents for models
    without images."""
    if getattr(service, "video", False):
        return service.save(out, req, out_dir, stem)
    images = service.images(out, req)
    if not images:
        return [atomic_write(os.path.join(out_dir, f"{stem}.pt"), lambda f: torch.save(out.cpu(), f))]
    names = [f"{stem}.png"] if len(images) == 1 else [f"{stem}-{i}.png" for i in range(len(images))]
    return [atomic_write(os.path.join(out_dir, n), lambda f, im=im: im.save(f, format="PNG"))
            for n, im in zip(names, images)]


def write_run(args, info, name, out, load_s, stem, files, output_stats=None) -> str:
    st = out.stats
    run = {"model": name, "model_arg": args.model, "mode": st.mode, "parallel": st.parallel, "steps": st.steps,
           "seed": args.seed, "ranks": info.world if info else 1, "backend": info.backend if info else "local",
           "drafts": args.drafts, "load_s": load_s, "latency_s": st.wall_time, "phases_s": st.phases,
           "serial_rounds": st.serial_rounds, "serial_rounds_plan": out.plan.serial_rounds if out.plan else None,
           "model_evals": st.model_evals, "ideal_speedup": st.ideal_speedup, "batch_widths": st.batch_widths,
           "files": [os.path.basename(f) for f in files], "args": vars(args), **(output_stats or {})}
    path = os.path.join(args.out, f"{stem}.json")
    return atomic_write(path, lambda f: f.write(json.dumps(run, indent=2).encode()))


if __name__ == "__main__":
    sys.exit(main())
