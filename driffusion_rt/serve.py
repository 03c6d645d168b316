"""HTTP front of the persistent engine, on rank 0:

    torchrun --nproc_per_node=N -m driffusion_rt.serve --model digits --port 8000
    curl -s localhost:8000/generate -d '{"prompt": "2026", "steps": 30, "mode": "aggressive"}' -o digits.png

POST /generate takes a JSON request (the fields of driffusion_rt.requests: prompt, negative_prompt, steps,
guidance_scale, height, width, seed, num_images, scheduler, mode, parallel, drafts, ...; video pipelines also
num_frames and fps; image pipelines image, mask_image and control_image as base64 PNG / JPEG, strength,
controlnet_conditioning_scale, lora_scale) plus "response": "png" (the default for image models: the first image as
image/png, stats in X-Driffusion-* headers), "mp4" (the default for video models: the first video as video/mp4,
stats in headers) or "base64" (JSON with every image as base64 PNG, every video as base64 MP4, or for gmm and fixed
the latents as a base64 .npy, and the stats). POST /v1/images/generations and GET /v1/models are OpenAI's images API
(openai_api.py). GET /health reports readiness, GET /metrics Prometheus metrics. The requests in flight share model
calls (--max-batch rows per call, engine.py); at most --max-queue wait (more get 503 with Retry-After). A request
whose client disconnects leaves the queue at once, or the batch at its next step. SIGTERM / SIGINT drain the server:
new requests get 503, those in flight are cancelled, every rank exits 0, and rank 0 answers 503 until
--drain-seconds have passed before it closes its socket. One JSON access-log line per request goes to rank 0's
standard output. The server binds 127.0.0.1 unless --host names another address and --allow-remote says so.
"""
import asyncio
import base64
import json
import re
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import torch

from . import cli, distributed, layout, openai_api
from .engine import DEFAULT_MAX_BATCH, POLICIES, Engine, ShuttingDown
from .model_ref import inspect_model
from .outputs import mp4_bytes, npy_bytes, png_bytes
from .requests import Limits, RequestError, request_bytes
from .services import load_service
from .waiting import QueueFull

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_QUEUE = 16
BACKLOG = 2048  # uvicorn's default backlog
DEFAULT_DRAIN_S = 2.0
PATHS = ("/generate", "/health", "/metrics", "/v1/images/generations", "/v1/models")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_REQUEST_ID = re.compile(r"^[\w.\-]{1,64}$")


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (prometheus_client)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # optional: the serve extra
        self.registry = r = CollectorRegistry()
        self.requests = Counter("driffusion_requests", "HTTP requests answered, by path and status", ["path", "status"],
                                registry=r)
        self.latency = Histogram("driffusion_request_latency_seconds", "time from arrival to answer of the "
                                 "requests the engine handled", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("driffusion_queue_wait_seconds", "time requests waited before they were "
                                    "sampled", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("driffusion_queue_depth", "requests waiting to be sampled", registry=r).set_function(
            lambda: engine.queued)
        Gauge("driffusion_in_flight", "requests being sampled", registry=r).set_function(lambda: engine.in_flight)
        self.model_evals = Counter("driffusion_model_evals", "model evaluations of completed requests", registry=r)
        self.rounds = Counter("driffusion_rounds", "serial model rounds of completed requests", registry=r)

    def exposition(self) -> tuple:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # optional: the serve extra
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def access_log_line(fields: dict) -> str:
    """One JSON object per request (time, request id, method, path, status, queue wait, latency, rounds, ...)."""
    return json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": "access",
                       **fields}, default=str)


class AccessLog:
    """ASGI middleware: a request id (X-Request-ID, taken from the request or made up), one access-log line and the
    request counters for every HTTP request, whatever answers it (handlers, 404, 405)."""

    def __init__(self, app, metrics: Metrics, write=None):
        self.app, self.metrics = app, metrics
        self.write = write or (lambda line: print(line, flush=True))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = dict(scope.get("headers") or {}).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["access"] = access = {}
        scope["state"]["request_id"] = rid
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id", rid.encode())])
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.write(access_log_line({"id": rid, "method": scope["method"], "path": scope["path"],
                                        "status": status[0], "latency_s": round(time.perf_counter() - t0, 6),
                                        **access}))


def make_app(engine: Engine, metrics: Metrics | None = None, write=None, poll_s: float = 0.1):
    """The Starlette app: it only queues requests for the engine thread, which does all collectives."""
    from starlette.applications import Starlette  # optional: the serve extra
    from starlette.requests import Request  # optional: the serve extra
    from starlette.responses import JSONResponse, Response  # optional: the serve extra
    from starlette.routing import Route  # optional: the serve extra

    metrics = metrics or Metrics(engine)
    max_body = request_bytes(engine.limits)  # the JSON fields and base64 images
    service = engine.service
    kinds = {"images": ("png", "base64"), "videos": ("mp4", "base64"), "latents": ("base64",)}[service.output]

    def error(status: int, message: str, request: Request, headers=None):
        return JSONResponse({"error": message, "request_id": request.state.request_id}, status_code=status,
                            headers=headers)

    async def answer(spec: dict, request: Request):
        """Run a request on the engine while watching its client: the engine's Result, or (status, message,
        headers) when it was refused (the queue is full, the server is stopping)."""
        t0 = time.perf_counter()
        cancel = threading.Event()
        try:
            future = engine.submit(spec, cancel)
        except QueueFull as e:
            return 503, f"server busy: {e}; retry later", {"Retry-After": str(engine.retry_after())}
        except ShuttingDown as e:
            return 503, str(e), None
        task = asyncio.ensure_future(asyncio.wrap_future(future))
        while not task.done():  # watch the client while the request waits or runs
            await asyncio.wait({task}, timeout=poll_s)
            if not task.done() and not cancel.is_set() and await request.is_disconnected():
                cancel.set()  # a waiting request leaves the queue now; a running one stops at its next step
                engine.withdraw(future)
        result = task.result()
        st = result.stats
        request.state.access.update(queue_s=round(st.get("queue_s", 0.0), 6), rounds=st.get("serial_rounds"),
                                    model_evals=st.get("model_evals"), mode=st.get("mode"), task=st.get("task"),
                                    frames=st.get("num_frames"), parallel=st.get("parallel"),
                                    batch_requests=st.get("batch_requests"))
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.queue_wait.observe(st.get("queue_s", 0.0))
        if result.ok:
            metrics.model_evals.inc(st["model_evals"])
            metrics.rounds.inc(st["serial_rounds"])
        return result

    async def generate(request: Request):
        if int(request.headers.get("content-length") or 0) > max_body:
            return error(413, f"request body over {max_body} bytes", request)
        body = await request.body()
        if len(body) > max_body:
            return error(413, f"request body over {max_body} bytes", request)
        try:
            spec = json.loads(body)
        except ValueError as e:
            return error(400, f"request body is not JSON: {e}", request)
        if not isinstance(spec, dict):
            return error(400, "request body must be a JSON object", request)
        kind = spec.pop("response", kinds[0])
        if kind not in kinds:
            what = {"images": "image", "videos": "video", "latents": "latent"}[service.output]
            return error(400, f"response must be {' or '.join(map(repr, kinds))} for {what} model {service.name}, "
                              f"got {kind!r}", request)
        result = await answer(spec, request)
        if not hasattr(result, "ok"):  # refused
            return error(*result[:2], request, headers=result[2])
        if not result.ok:  # 499 when its client left: logged and counted, though nobody reads the answer
            return error(result.status, result.error, request)
        rid = request.state.request_id
        if service.output == "latents":  # gmm, fixed: the final latents as one .npy
            return JSONResponse({"latents": base64.b64encode(npy_bytes(result.latent)).decode(),
                                 "shape": list(result.latent.shape), "dtype": str(result.latent.dtype)[6:],
                                 "stats": result.stats, "request_id": rid})
        video = service.output == "videos"
        if kind == "base64":
            if video:
                fps = result.stats["fps"]
                videos = [base64.b64encode(mp4_bytes(v, fps)).decode() for v in result.images]
                return JSONResponse({"videos": videos, "stats": result.stats, "request_id": rid})
            images = [base64.b64encode(png_bytes(im)).decode() for im in result.images]
            return JSONResponse({"images": images, "stats": result.stats, "request_id": rid})
        headers = {f"X-Driffusion-{k.replace('_', '-')}": str(v) for k, v in result.stats.items()}
        headers["X-Driffusion-images"] = str(len(result.images))
        if video:
            return Response(mp4_bytes(result.images[0], result.stats["fps"]), media_type="video/mp4",
                            headers=headers)
        return Response(png_bytes(result.images[0]), media_type="image/png", headers=headers)

    async def health(request: Request):
        world = engine.info.world if engine.info else 1
        ok = not engine.stopping
        return JSONResponse({"ok": ok, "model": service.name, "ranks": world, "served": engine.served,
                             "queued": engine.queued, "max_queue": engine.max_queue,
                             "in_flight": engine.in_flight, "max_batch": engine.batch.max_rows},
                            status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request):
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    app = Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/health", health),
                            Route("/metrics", metrics_endpoint)] + openai_api.routes(engine, answer, max_body))
    return AccessLog(app, metrics, write)


def parser():
    p = cli.parser("python -m driffusion_rt.serve", __doc__)
    cli.add_model_flags(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    s.add_argument("--allow-remote", action="store_true",
                   help="required to bind an address other than loopback: the server has no authentication")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, see --port-file)")
    s.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    s.add_argument("--max-requests", type=int, default=0,
                   help="stop after this many requests (default 0: serve forever)")
    s.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait behind those in flight; more get 503 with Retry-After "
                        f"(default {DEFAULT_MAX_QUEUE})")
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="ROWS",
                   help=f"latent rows one model call evaluates on a rank, over the requests that share it (a "
                        f"request's rows: its points on the rank times its images); 1 serves one request at a time "
                        f"(default {DEFAULT_MAX_BATCH})")
    s.add_argument("--draft-policy", default="shrink", choices=POLICIES,
                   help="while the batch has too few rows free for a request: shrink its n until its rows fit "
                        "(never below 1; the default), or wait until they do")
    s.add_argument("--drain-seconds", type=float, default=DEFAULT_DRAIN_S,
                   help=f"after SIGTERM / SIGINT, the seconds the server keeps answering 503 (and /health 503) "
                        f"before it closes its socket, so clients and load balancers see 503, not refused "
                        f"connections (default {DEFAULT_DRAIN_S:g})")
    cli.add_runtime_flags(p)
    cli.add_limit_flags(p)
    return p


def check_args(args) -> Limits:
    """Checks of the flags; returns the request limits. Raises ValueError naming the bad value."""
    if args.host not in LOOPBACK and not args.allow_remote:
        raise ValueError(f"--host {args.host} is not a loopback address; the server has no authentication, so "
                         f"binding it needs --allow-remote")
    if args.max_requests < 0 or args.max_queue < 1:
        raise ValueError(f"--max-requests must be >= 0 and --max-queue >= 1, got {args.max_requests} and "
                         f"{args.max_queue}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1 rows, got {args.max_batch}")
    if not args.drain_seconds >= 0:
        raise ValueError(f"--drain-seconds must be >= 0, got {args.drain_seconds}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    return cli.check_shared_args(args)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a taken port fails at once) and listening at once, so a
    client that connects before the HTTP server runs waits in the backlog instead of being refused. Raises
    ValueError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        limits = check_args(args)
        info = distributed.maybe_init_dist(args.timeout, args.device, args.load_timeout)
        layout.check_world(args.cfg_parallel, info.world if info else 1, args.ulysses, args.ring)  # before loading
    except ValueError as e:
        cli.bad_input(str(e))
    rank = info.rank if info else 0
    verdict, sock = None, None
    if rank == 0:
        try:
            inspect_model(args.model, args.lora, args.controlnet).check_sequence(None, args.ulysses, args.ring)
            sock = bind(args.host, args.port)
        except ValueError as e:
            verdict = str(e)
    if not distributed.rank0_agrees(info, verdict is None):
        cli.bad_input(verdict or "", info)
    device = info.device if info else distributed.pick_device(args.device)
    try:  # LoRA weights or a ControlNet that do not load: bad input, the same on every rank
        service = load_service(args.model, device, getattr(torch, args.dtype), args.model_cost,
                               loras=args.lora, controlnets=args.controlnet, cost_per_row=args.model_cost_per_row)
    except RequestError as e:
        cli.bad_input(str(e), info)
    distributed.ready(info)
    engine = Engine(service, limits, args.timeout, cuda_graphs=not args.no_cuda_graphs, max_queue=args.max_queue,
                    cfg_parallel=args.cfg_parallel, ulysses=args.ulysses, ring=args.ring, max_batch=args.max_batch,
                    draft_policy=args.draft_policy)
    if engine.rank != 0:
        engine.serve()
        return 0
    import uvicorn  # optional: the serve extra
    server = uvicorn.Server(uvicorn.Config(make_app(engine), log_level="warning", access_log=False))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    http.start()
    port = sock.getsockname()[1]
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(str(port))
    print(f"driffusion_rt serve: {service.name} on http://{args.host}:{port} "
          f"({info.world if info else 1} rank(s), {device}, --max-batch {args.max_batch}); POST /generate, "
          f"POST /v1/images/generations, GET /v1/models, GET /health, GET /metrics", flush=True)
    stop = threading.Event()
    engine.on_answer = (lambda n: stop.set() if args.max_requests and n >= args.max_requests else None)
    try:
        engine.serve(stop=stop)
        if engine.stopped_at is not None:  # a signal: new requests keep getting 503 until the drain time is over
            time.sleep(max(0.0, engine.stopped_at + args.drain_seconds - time.monotonic()))
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
