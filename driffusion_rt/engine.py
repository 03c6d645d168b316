"""A persistent engine under torchrun: replicas, buffers and CUDA graphs live across requests.

Every rank loads its replica and enters the engine. Rank 0 takes requests (the Python API `Engine.generate`, or
the HTTP front in serve.py through a bounded queue), validates each one once into a frozen Request (requests.parse,
then the loaded service's admit), and sends it to the other ranks as bytes in a tensor (Request.to_wire: JSON, no
pickle on the request path); every rank then prepares it and runs the same plan. A request that
fails validation is answered with an error before anything is sent; a request that fails inside sampling (a
non-finite model output) fails on every rank at the same point, is answered with an error, and the engine keeps
serving. A request whose caller cancels it (its client went away) stops on every rank at the next round boundary.
A failed collective (a rank died or hung) is fatal: the process group cannot be trusted any more, so the rank
reports it and exits. SIGTERM or SIGINT stop the engine gracefully: no new requests, the one in flight is cancelled
at its next round, queued ones are answered 503, every rank leaves the group and exits 0 with one line.

    engine = Engine(load_service("digits", device))      # on every rank
    engine.serve(lambda eng: eng.generate({"prompt": "42", "steps": 20}))  # rank 0 runs the function; others follow
"""
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import distributed
from .distributed import DEFAULT_TIMEOUT_S, CollectiveTimeout, collective
from .evaluator import ModelOutputError
from .layout import guided, parallelize, resolve
from .requests import Limits, Request, RequestError, parse, request_bytes
from .results import Cancelled
from .services import check_sequence

# Header broadcast from rank 0: [op, payload bytes, cancellable].
REQUEST, PING, SHUTDOWN = 1, 2, 3


@dataclass
class Result:
    """A request's outcome: images (rank 0; PIL) and stats, or an error message. `status` is the HTTP status the
    server answers with: 200, 422 (invalid request), 499 (cancelled by its caller), 500 (the model failed on it),
    503 (the engine is shutting down)."""
    ok: bool
    images: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    error: str | None = None
    latent: torch.Tensor | None = None
    status: int = 200


class QueueFull(RuntimeError):
    """The engine's queue holds max_queue requests already."""


class ShuttingDown(RuntimeError):
    """The engine takes no new requests: it is stopping."""


@dataclass
class _Job:
    spec: dict
    future: Future
    cancel: threading.Event | None
    enqueued: float = field(default_factory=time.monotonic)


class Engine:
    """Rank 0 serves requests; the other ranks follow. One request at a time, in submission order."""

    def __init__(self, service, limits: Limits = Limits(), timeout_s: float = DEFAULT_TIMEOUT_S,
                 cuda_graphs: bool = True, heartbeat_s: float = 2.0, max_queue: int = 0, cfg_parallel="1",
                 ulysses: int = 1, ring: int = 1):
        self.info = distributed.maybe_init_dist(timeout_s)  # the group serve.py (or the caller) joined already
        self.rank = self.info.rank if self.info else 0
        self.device = self.info.device if self.info else getattr(service, "device", torch.device("cpu"))
        self.service, self.limits, self.heartbeat_s = service, limits, heartbeat_s
        # The layout is fixed for the engine's life ("auto": a guidance pair when the ranks hold whole pairs);
        # requests without guidance are then refused (422): a pair would compute them twice. Under sequence groups
        # (ulysses x ring) a request whose token counts they cannot split is refused (422) too.
        world = self.info.world if self.info else 1
        cfg = resolve(cfg_parallel, world, True, ulysses, ring)
        self.sampler = parallelize(service.model, getattr(service, "pipe", None), cfg=cfg, info=self.info,
                                   cuda_graphs=cuda_graphs, ulysses=ulysses, ring=ring)
        self.layout = self.sampler.layout
        self.header = torch.zeros(3, dtype=torch.long, device=self.device)
        self.max_bytes = request_bytes(limits)  # JSON fields and base64 images: every rank builds the same
        self.payload = torch.zeros(self.max_bytes, dtype=torch.uint8, device=self.device)
        self.queue = queue.Queue(maxsize=max_queue)  # requests waiting (0: unbounded); the one in flight is not in it
        self.served = self.answered = 0  # requests sampled / answered (errors included)
        self.in_flight = 0
        self.on_answer = None            # rank 0: called with `answered` after each queued request
        self.stopped_by = None           # the signal that stopped the engine
        self._stop = None
        self._current = None             # rank 0: the job being served

    # ------------------------------------------------------------------------------------------ rank 0

    def generate(self, spec: dict, cancel: threading.Event | None = None) -> Result:
        """Serve one request (rank 0, on the thread that runs the engine). Never raises for a bad request.
        Setting `cancel` stops the request on every rank at its next round boundary (status 499)."""
        try:
            request = self.service.admit(parse(spec, self.service, self.limits))
            check_sequence(self.service, request, self.layout.ulysses, self.layout.ring)
        except RequestError as e:
            return Result(False, error=str(e), status=422)
        body = request.to_wire()
        if len(body) > self.max_bytes:
            return Result(False, error=f"request is {len(body)} bytes encoded; the limit is {self.max_bytes}",
                          status=422)
        self._send(REQUEST, body, cancel is not None)
        return self._run(request, cancel)

    def submit(self, spec: dict, cancel: threading.Event | None = None) -> Future:
        """Queue a request from any thread (e.g. an HTTP handler); the engine thread serves it in order. Raises
        QueueFull when max_queue requests are waiting, ShuttingDown once the engine is stopping."""
        if self.stopping:
            raise ShuttingDown("the server is shutting down")
        job = _Job(spec, Future(), cancel)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are queued already") from None
        return job.future

    @property
    def stopping(self) -> bool:
        return self.stopped_by is not None or (self._stop is not None and self._stop.is_set())

    def serve(self, main=None, stop: threading.Event | None = None):
        """Run the engine on every rank. Rank 0 runs `main(engine)` if given, else serves the queue until `stop` is
        set or a SIGTERM / SIGINT arrives; then it shuts every rank down. The other ranks follow rank 0's requests
        until the shutdown."""
        self._stop = stop
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._signalled)
        try:
            if self.rank != 0:
                return self._follow()
            if main is not None:
                main(self)
            while main is None and not self.stopping:
                try:
                    job = self.queue.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    self._send(PING, b"")  # an idle engine still notices a dead rank
                    continue
                self._serve_job(job)
        except CollectiveTimeout as e:
            print(f"driffusion_rt engine: rank {self.rank}: {e}", file=sys.stderr, flush=True)
            distributed.exit_now(1)
        except BaseException:
            if self.rank == 0:  # main() failed: still release the other ranks
                self._drain()
                self.shutdown()
            raise
        if self.rank == 0:
            self._drain()
            self.shutdown()

    def _serve_job(self, job: _Job):
        if not job.future.set_running_or_notify_cancel():
            return
        queue_s = time.monotonic() - job.enqueued
        if job.cancel is not None and job.cancel.is_set():  # its client left while it waited: no rank does work
            result = Result(False, error="cancelled before it started", status=499)
        else:
            self._current, self.in_flight = job, 1
            try:
                result = self.generate(job.spec, job.cancel)
            except BaseException as e:  # fatal for the engine (the ranks may be out of step), but answer first
                job.future.set_result(Result(False, error=f"internal error: {type(e).__name__}: {e}", status=500))
                raise
            finally:
                self._current, self.in_flight = None, 0
            if result.status == 499 and self.stopped_by is not None:  # cancelled by the shutdown, not its client
                result = Result(False, error=f"the server is shutting down: {result.error}", status=503)
        result.stats["queue_s"] = queue_s
        job.future.set_result(result)
        self.answered += 1
        if self.on_answer is not None:
            self.on_answer(self.answered)

    def _drain(self):
        """Answer every queued request: the engine is stopping."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(Result(False, error="the server is shutting down", status=503))

    def _signalled(self, signum, frame):
        """SIGTERM / SIGINT: stop taking requests and cancel the one in flight at its next round (rank 0); the other
        ranks keep following rank 0 until its shutdown arrives. Only sets flags: it runs between bytecodes."""
        self.stopped_by = signum
        if self._current is not None and self._current.cancel is not None:
            self._current.cancel.set()

    def shutdown(self):
        """Rank 0: tell every rank to leave, then leave the process group (safe to call twice)."""
        if self.info is not None and self.header is not None:
            try:
                self._send(SHUTDOWN, b"")
            except CollectiveTimeout as e:
                print(f"driffusion_rt engine: rank {self.rank}: {e}", file=sys.stderr, flush=True)
                distributed.exit_now(1)
            self.header = None
            distributed.teardown(self.info)
        self._say_stopped()

    def _say_stopped(self):
        if self.stopped_by is not None:
            print(f"driffusion_rt engine: rank {self.rank}: stopped by {signal.Signals(self.stopped_by).name}; "
                  f"exiting", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------ all ranks

    def _send(self, op: int, body: bytes, cancellable: bool = False):
        if self.info is None:
            return
        self.header[0], self.header[1], self.header[2] = op, len(body), int(cancellable)
        collective("broadcast", dist.broadcast, self.header, 0, info=self.info)
        if body:
            self.payload[: len(body)].copy_(torch.frombuffer(bytearray(body), dtype=torch.uint8))
            collective("broadcast", dist.broadcast, self.payload[: len(body)], 0, info=self.info)

    def _follow(self):
        while True:
            collective("broadcast", dist.broadcast, self.header, 0, info=self.info)
            op, n, cancellable = (int(v) for v in self.header.tolist())
            if op == SHUTDOWN:
                distributed.teardown(self.info)
                self._say_stopped()
                return
            if op == REQUEST:
                collective("broadcast", dist.broadcast, self.payload[:n], 0, info=self.info)
                request = Request.from_wire(bytes(self.payload[:n].cpu().numpy()))
                self._run(request, threading.Event() if cancellable else None)

    def _run(self, request: Request, cancel=None) -> Result:
        """Sample one validated request; every rank runs this with the same request (and a cancel event or None)."""
        t0 = time.perf_counter()
        try:
            prepared = self.service.prepare(request)
            if self.layout.cfg > 1 and not guided(self.service.model, prepared.model_kwargs):
                raise RequestError(f"this server splits classifier-free guidance across ranks (--cfg-parallel "
                                   f"{self.layout.cfg}); requests must use guidance (guidance_scale > 1, a negative "
                                   f"prompt with true_cfg_scale for Flux)")
            with torch.no_grad():
                out = self.sampler.apply(prepared, request.options, cancel=cancel)
        except Cancelled as e:  # rank 0 cancelled it: every rank stopped at the same round
            return Result(False, error=f"cancelled ({e})", status=499)
        except ModelOutputError as e:  # a non-finite model output: the same on every rank, left together
            return Result(False, error=str(e), status=500)
        except ValueError as e:  # bad values the checks could not see before sampling
            return Result(False, error=str(e), status=422)
        self.served += 1
        if self.rank != 0:
            return Result(True)
        images, output_stats = self.service.outputs(out, request, prepared)
        st = out.stats
        stats = dict(mode=st.mode, parallel=st.parallel, cfg_parallel=self.layout.cfg, ulysses=self.layout.ulysses,
                     ring=self.layout.ring, steps=st.steps,
                     serial_rounds=st.serial_rounds,
                     model_evals=st.model_evals, ideal_speedup=st.ideal_speedup, sample_s=st.wall_time,
                     total_s=time.perf_counter() - t0)
        if request.resolved.get("task"):  # image pipelines: text2img, img2img, inpaint or controlnet
            stats["task"] = request.resolved["task"]
        stats.update(output_stats)  # video: frames, fps, the decode's seconds and peak memory
        return Result(True, images, stats, latent=out.sample)
