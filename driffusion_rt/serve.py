"""HTTP front of the persistent engine, on rank 0:

    torchrun --nproc_per_node=N -m driffusion_rt.serve --model digits --port 8000
    curl -s localhost:8000/generate -d '{"prompt": "2026", "steps": 30, "mode": "aggressive"}' -o digits.png

POST /generate takes a JSON request (the fields of driffusion_rt.services: prompt, negative_prompt, steps,
guidance_scale, height, width, seed, num_images, scheduler, mode, parallel, drafts, ...; video pipelines also
num_frames and fps; image pipelines image, mask_image and control_image as base64 PNG / JPEG, strength,
controlnet_conditioning_scale, lora_scale) plus "response": "png" (the default for image models: the first image as
image/png, stats in X-Driffusion-* headers), "mp4" (the default for video models: the first video as video/mp4,
stats in headers) or "base64" (JSON with every image as base64 PNG, or every video as base64 MP4, and the stats).
GET /health reports readiness. Requests are served one at a time in arrival order. The server binds 127.0.0.1
unless --host names another address and --allow-remote says so explicitly.
"""
import argparse
import asyncio
import base64
import io
import json
import socket
import sys
import threading

import torch

from . import services
from .distributed import DEFAULT_TIMEOUT_S
from .engine import Engine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_app(engine: Engine):
    """The Starlette app: it only queues requests for the engine thread, which does all collectives."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    max_body = services.request_bytes(engine.limits)  # the JSON fields and base64 images

    async def generate(request: Request):
        if int(request.headers.get("content-length") or 0) > max_body:
            return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)
        body = await request.body()
        if len(body) > max_body:
            return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)
        try:
            spec = json.loads(body)
        except ValueError as e:
            return JSONResponse({"error": f"request body is not JSON: {e}"}, status_code=400)
        if not isinstance(spec, dict):
            return JSONResponse({"error": "request body must be a JSON object"}, status_code=400)
        video = getattr(engine.service, "video", False)
        kinds = ("mp4", "base64") if video else ("png", "base64")
        kind = spec.pop("response", kinds[0])
        if kind not in kinds:
            return JSONResponse({"error": f"response must be {' or '.join(map(repr, kinds))} for "
                                          f"{'video' if video else 'image'} model {engine.service.name}, got "
                                          f"{kind!r}"}, status_code=400)
        result = await asyncio.wrap_future(engine.submit(spec))
        if not result.ok:
            return JSONResponse({"error": result.error}, status_code=422)
        if not result.images:
            return JSONResponse({"error": f"model {engine.service.name} produces no images"}, status_code=422)
        if video:
            from .video_service import mp4_bytes
            fps = result.stats["fps"]
            if kind == "base64":
                videos = [base64.b64encode(mp4_bytes(v, fps)).decode() for v in result.images]
                return JSONResponse({"videos": videos, "stats": result.stats})
        elif kind == "base64":
            images = [base64.b64encode(png_bytes(im)).decode() for im in result.images]
            return JSONResponse({"images": images, "stats": result.stats})
        headers = {f"X-Driffusion-{k.replace('_', '-')}": str(v) for k, v in result.stats.items()}
        if video:
            return Response(mp4_bytes(result.images[0], fps), media_type="video/mp4", headers=headers)
        return Response(png_bytes(result.images[0]), media_type="image/png", headers=headers)

    async def health(request: Request):
        world = engine.info.world if engine.info else 1
        return JSONResponse({"ok": True, "model": engine.service.name, "ranks": world, "served": engine.served})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health)])


def parser():
    p = argparse.ArgumentParser(prog="python -m driffusion_rt.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="digits (default), a diffusers pipeline directory or hub id, "
                                                      "gmm or fixed")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="required to bind an address other than loopback: the server has no authentication")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="model dtype")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait for the other ranks before the engine fails")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the model eagerly on GPU")
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (0: serve forever)")
    lim = services.Limits()
    p.add_argument("--max-prompt-chars", type=int, default=lim.prompt_chars, help="longest prompt accepted")
    p.add_argument("--max-side", type=int, default=lim.side, help="largest height or width accepted, pixels")
    p.add_argument("--max-steps", type=int, default=lim.steps, help="most sampling steps accepted")
    p.add_argument("--max-images", type=int, default=lim.images, help="most images per request")
    p.add_argument("--max-parallel", type=int, default=lim.parallel, help="largest parallel n accepted")
    p.add_argument("--max-frames", type=int, default=lim.frames, help="most frames per video accepted")
    p.add_argument("--max-image-bytes", type=int, default=lim.image_bytes,
                   help="most bytes of images (image, mask_image, control_image, decoded) per request")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA weights to load into the pipeline at start, with their scale (repeatable)")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="a ControlNetModel directory: serve the SD / SDXL ControlNet pipeline; requests then carry "
                        "one control_image per --controlnet (repeatable: MultiControlNet)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.host not in LOOPBACK and not args.allow_remote:
        p.error(f"--host {args.host} is not a loopback address; the server has no authentication, so binding it "
                f"needs --allow-remote")
    for name in ("max_prompt_chars", "max_side", "max_steps", "max_images", "max_parallel", "max_frames",
                 "max_image_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_requests < 0 or not 0 <= args.port < 65536:
        p.error("--max-requests must be >= 0 and --port in 0..65535")
    if args.lora:  # (the pipelines package imports diffusers: only when needed)
        from .pipelines.lora import check_lora_path, parse_lora
        try:
            for spec in args.lora:
                check_lora_path(parse_lora(spec)[0])
        except (ValueError, FileNotFoundError) as e:
            p.error(f"--lora: {e}")
    limits = services.Limits(args.max_prompt_chars, args.max_side, args.max_steps, args.max_images, args.max_parallel,
                             args.max_frames, args.max_image_bytes)
    from .distributed import maybe_init_dist
    info = maybe_init_dist(args.timeout)
    device = info.device if info else torch.device("cpu")
    service = services.load_service(args.model, device, getattr(torch, args.dtype), loras=args.lora,
                                    controlnets=args.controlnet)
    engine = Engine(service, limits, args.timeout, cuda_graphs=not args.no_cuda_graphs)
    if engine.rank != 0:
        engine.serve()
        return 0
    import uvicorn
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = uvicorn.Server(uvicorn.Config(make_app(engine), log_level="warning"))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    http.start()
    port = sock.getsockname()[1]
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(str(port))
    print(f"driffusion_rt serve: {service.name} on http://{args.host}:{port} "
          f"({info.world if info else 1} rank(s)); POST /generate", flush=True)
    stop = threading.Event()
    engine.on_answer = (lambda n: stop.set() if args.max_requests and n >= args.max_requests else None)
    try:
        engine.serve(stop=stop)
    except KeyboardInterrupt:
        print("driffusion_rt serve: interrupted, shutting down", file=sys.stderr)
    finally:
        server.should_exit = True
        http.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
