"""A persistent engine under torchrun: replicas, buffers and CUDA graphs live across requests, and the requests in
flight share model calls (step-level batching, batch.py; docs/design.md section 5).

Every rank loads its replica and enters the engine. Rank 0 takes requests (the Python API `Engine.generate` /
`submit`, or the HTTP front in serve.py) and validates each one once (requests.parse, then the service's admit); a
bad request is answered at once and no rank works on it. Then, step by step: rank 0 decides which waiting requests
are admitted and which admitted ones are cancelled and broadcasts that (a header, then JSON and each request's
Request.to_wire bytes; no pickle); every rank prepares the admitted ones, moves them into the batch in order while
they can share its calls and their rows fit in max_batch (`batch.degree` shrinks n to fit under the "shrink"
policy; the same state on every rank gives the same decision without a message), and runs one batch step: one
model call per rank, one all-gather; finished requests are answered (rank 0 decodes). Requests without a plan
(picard, parasolver, adaptive) run alone, in order, once the batch is empty. A non-finite output fails its own
request (500); a cancelled request leaves at the next step (499); a failed collective is fatal (the rank reports it
and exits); an idle engine broadcasts a heartbeat every 2 s. SIGTERM / SIGINT: no new requests, those in flight
cancelled at their next step and answered 503 with the waiting ones, every rank leaves the group and exits 0 with
one line.

    engine = Engine(load_service("digits", device))      # on every rank
    engine.serve(lambda eng: eng.generate({"prompt": "42", "steps": 20}))  # rank 0 runs the function; others follow
"""
import collections
import itertools
import json
import math
import statistics
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import distributed
from .batch import Batch, degree, rows
from .distributed import DEFAULT_TIMEOUT_S, CollectiveTimeout, collective
from .evaluator import ModelOutputError
from .layout import guided, parallelize, resolve
from .requests import Limits, Request, RequestError, parse, request_bytes
from .results import Cancelled
from .services import check_sequence
from .waiting import QueueFull, Waiting

# Header broadcast from rank 0: [op, payload bytes].
STEP, PING, SHUTDOWN = 1, 2, 3
DEFAULT_MAX_BATCH = 16  # rows per model call per rank (docs/server.md: chosen from perf/bench_serving.py)
POLICIES = ("shrink", "wait")


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


class ShuttingDown(RuntimeError):
    """The engine takes no new requests: it is stopping."""


@dataclass
class _Job:
    """Rank 0: a request from its submission until it is answered."""
    spec: dict
    future: Future
    cancel: threading.Event | None
    enqueued: float = field(default_factory=time.monotonic)
    request: Request | None = None  # once validated
    wire: bytes = b""
    prepared: object = None
    started: float | None = None    # when it joined the batch or began alone


@dataclass
class _Ready:
    """Every rank: an admitted request, prepared, waiting to join the batch."""
    key: int
    request: Request
    prepared: object
    cancel: threading.Event | None


class Engine:
    """Rank 0 serves requests; the other ranks follow. The requests in flight share model calls, in steps."""

    def __init__(self, service, limits: Limits = Limits(), timeout_s: float = DEFAULT_TIMEOUT_S,
                 cuda_graphs: bool = True, heartbeat_s: float = 2.0, max_queue: int = 0, cfg_parallel="1",
                 ulysses: int = 1, ring: int = 1, max_batch: int = DEFAULT_MAX_BATCH, draft_policy: str = "shrink"):
        if draft_policy not in POLICIES:
            raise ValueError(f"draft_policy must be one of {', '.join(POLICIES)}, got {draft_policy!r}")
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
        self.batch = Batch(self.sampler.ev, service.model, max_batch)
        self.draft_policy = draft_policy
        self.header = torch.zeros(2, dtype=torch.long, device=self.device)
        self.max_bytes = request_bytes(limits)  # JSON fields and base64 images: every rank builds the same
        self.payload = torch.zeros(self.max_bytes, dtype=torch.uint8, device=self.device)
        self.queue, self.max_queue = Waiting(), max_queue  # rank 0: requests not yet admitted (0: unbounded)
        self.ready = []                  # every rank: admitted and prepared, not yet in the batch
        self.jobs = {}                   # rank 0: key -> _Job, admitted and not yet answered
        self._keys = itertools.count()
        self.alone = None                # the key of the request running alone, if any
        self.served = self.answered = 0  # requests sampled / answered (errors included)
        self.service_s = collections.deque(maxlen=16)  # rank 0: the last requests' seconds from start to answer
        self.on_answer = None            # rank 0: called with `answered` after each answer
        self.stopped_by = None           # the signal that stopped the engine
        self.stopped_at = None           # when it came (time.monotonic)
        self._stop = None

    # ------------------------------------------------------------------------------------------ rank 0

    @property
    def in_flight(self) -> int:
        """Requests being sampled (in the batch, or the one running alone)."""
        return len(self.batch) + (self.alone is not None)

    @property
    def queued(self) -> int:
        """Requests waiting: in the queue, or admitted and not yet sampled."""
        return len(self.queue) + len(self.ready)

    @property
    def stopping(self) -> bool:
        return self.stopped_by is not None or (self._stop is not None and self._stop.is_set())

    def generate(self, spec: dict, cancel: threading.Event | None = None) -> Result:
        """Serve one request (rank 0, on the thread that runs the engine) and return its Result; never raises for a
        bad request. Setting `cancel` stops the request on every rank at its next step (status 499)."""
        job = _Job(spec, Future(), cancel)
        self.queue.put(job)
        while not job.future.done():
            self.step()
        return job.future.result()

    def submit(self, spec: dict, cancel: threading.Event | None = None) -> Future:
        """Queue a request from any thread (e.g. an HTTP handler); the engine thread serves it. Raises QueueFull
        when max_queue requests are waiting, ShuttingDown once the engine is stopping."""
        if self.stopping:
            raise ShuttingDown("the server is shutting down")
        if self.max_queue and self.queued >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are queued already")
        job = _Job(spec, Future(), cancel)
        self.queue.put(job)
        return job.future

    def withdraw(self, future: Future) -> bool:
        """A request whose caller went away: if it is still waiting, it leaves the queue now and is answered 499
        (True); once admitted, its cancel event stops it at the next step instead (False)."""
        job = self.queue.take(lambda j: j.future is future)
        if job is None:
            return False
        if job.future.set_running_or_notify_cancel():
            job.future.set_result(Result(False, error="cancelled while it waited", status=499,
                                         stats={"queue_s": time.monotonic() - job.enqueued}))
        self._answered()
        return True

    def retry_after(self) -> int:
        """Seconds after which a refused request may find room: the measured service time of a request (the median
        of the last 16, from start to answer, without queue wait; 1 s before any was measured) times the requests
        waiting, divided by the requests served at once."""
        service = statistics.median(list(self.service_s)) if self.service_s else 1.0  # list(): one C call
        return max(1, math.ceil(service * self.queued / max(1, self.in_flight)))

    def serve(self, main=None, stop: threading.Event | None = None):
        """Run the engine on every rank. Rank 0 runs `main(engine)` if given, else serves the queue until `stop` is
        set or a SIGTERM / SIGINT arrives; then it shuts every rank down. The other ranks follow rank 0's decisions
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
                self.step(self.heartbeat_s)
        except CollectiveTimeout as e:
            print(f"driffusion_rt engine: rank {self.rank}: {e}", file=sys.stderr, flush=True)
            distributed.exit_now(1)
        except BaseException:
            if self.rank == 0:  # main() failed: still release the other ranks
                self._close()
            raise
        if self.rank == 0:
            self._close()

    def _close(self):
        """Answer everything in flight and waiting (503: the engine is stopping), then shut every rank down."""
        self._stop = self._stop or threading.Event()
        self._stop.set()
        if self.jobs:
            self.step()  # cancels every admitted request on every rank
        while (job := self.queue.peek()) is not None:
            if self.queue.remove(job) and job.future.set_running_or_notify_cancel():
                job.future.set_result(Result(False, error="the server is shutting down", status=503))
        self.shutdown()

    def _signalled(self, signum, frame):
        """SIGTERM / SIGINT: stop taking requests; those in flight are cancelled at their next step (the one running
        alone at its next round). Only sets flags: it runs between bytecodes."""
        self.stopped_by, self.stopped_at = signum, time.monotonic()
        job = self.jobs.get(self.alone)
        if job is not None and job.cancel is not None:
            job.cancel.set()

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

    def step(self, wait_s: float = 0.0):
        """One step of the engine (rank 0; `serve` loops on it, a `main` may call it): decide, send the decision,
        advance every rank; when there is nothing to do, wait up to `wait_s` for a request and send a heartbeat if
        none came."""
        cancel, admit = self._decide()
        if not (cancel or admit or self.ready or len(self.batch)):
            if wait_s and not self.queue.wait(wait_s):
                self._send(PING, b"")
            return
        body = b""
        if cancel or admit:
            head = {"cancel": cancel, "admit": [[key, self.jobs[key].cancel is not None, len(self.jobs[key].wire)]
                                                for key in admit]}
            body = json.dumps(head).encode() + b"\n" + b"".join(self.jobs[key].wire for key in admit)
        self._send(STEP, body)
        try:
            finished = self._advance(cancel, [(key, self.jobs[key].cancel is not None, self.jobs[key].request)
                                              for key in admit])
        except BaseException as e:  # fatal for the engine (the ranks may be out of step), but answer first
            for job in self.jobs.values():
                if not job.future.done():
                    job.future.set_result(Result(False, error=f"internal error: {type(e).__name__}: {e}", status=500))
            self.jobs.clear()
            raise
        for key, outcome in finished:
            self._answer(key, outcome)

    def _decide(self) -> tuple:
        """(keys to cancel, keys to admit): every admitted request once the engine stops or its caller cancelled it;
        waiting requests, in order, validated, while the batch has rows for them (at least one; the payload within
        the request size limit)."""
        cancel = [key for key, job in self.jobs.items()
                  if self.stopping or (job.cancel is not None and job.cancel.is_set())]
        admit, size = [], 0
        want = 0 if self.stopping else max(1, self.batch.room) - len(self.ready)
        while len(admit) < want and (job := self.queue.peek()) is not None:
            if job.request is None:  # validated once, on this thread
                error = None
                if job.cancel is not None and job.cancel.is_set():
                    error = Result(False, error="cancelled before it started", status=499)
                else:
                    try:
                        job.request = self.service.admit(parse(job.spec, self.service, self.limits))
                        check_sequence(self.service, job.request, self.layout.ulysses, self.layout.ring)
                        job.wire = job.request.to_wire()
                        if len(job.wire) > self.max_bytes:
                            error = Result(False, error=f"request is {len(job.wire)} bytes encoded; the limit is "
                                                        f"{self.max_bytes}", status=422)
                    except RequestError as e:
                        error = Result(False, error=str(e), status=422)
                if error is not None:
                    if self.queue.remove(job) and job.future.set_running_or_notify_cancel():
                        error.stats["queue_s"] = time.monotonic() - job.enqueued
                        job.future.set_result(error)
                        self._answered()
                    continue
            if admit and size + len(job.wire) > self.max_bytes:
                break
            if not self.queue.remove(job) or not job.future.set_running_or_notify_cancel():
                continue  # withdrawn meanwhile, or its future was cancelled
            key = next(self._keys)
            self.jobs[key] = job
            admit.append(key)
            size += len(job.wire)
        return cancel, admit

    def _answer(self, key: int, outcome):
        job = self.jobs.pop(key)
        result = self._result(job, outcome)
        result.stats["queue_s"] = (job.started or time.monotonic()) - job.enqueued
        if result.ok and job.started is not None:
            result.stats["total_s"] = time.monotonic() - job.started
            self.service_s.append(result.stats["total_s"])
        job.future.set_result(result)
        self._answered()

    def _answered(self):
        self.answered += 1
        if self.on_answer is not None:
            self.on_answer(self.answered)

    def _result(self, job: _Job, outcome) -> Result:
        if isinstance(outcome, Cancelled):
            if self.stopped_by is not None:  # cancelled by the shutdown, not its client
                return Result(False, error=f"the server is shutting down: {outcome}", status=503)
            return Result(False, error=f"cancelled ({outcome})", status=499)
        if isinstance(outcome, ModelOutputError):  # a non-finite model output: the same on every rank
            return Result(False, error=str(outcome), status=500)
        if isinstance(outcome, ValueError):  # bad values the checks could not see before sampling
            return Result(False, error=str(outcome), status=422)
        images, output_stats = self.service.outputs(outcome, job.request, job.prepared)
        st = outcome.stats
        stats = dict(mode=st.mode, parallel=st.parallel, cfg_parallel=self.layout.cfg, ulysses=self.layout.ulysses,
                     ring=self.layout.ring, steps=st.steps, serial_rounds=st.serial_rounds, model_evals=st.model_evals,
                     ideal_speedup=st.ideal_speedup, sample_s=st.wall_time, batch_requests=st.batch_requests)
        asked = job.request.options.n(self.sampler.ev.world)
        if st.parallel != asked and job.request.options.planned:  # the draft policy shrank n
            stats["parallel_requested"] = asked
        if job.request.resolved.get("task"):  # image pipelines: text2img, img2img, inpaint, controlnet or edit
            stats["task"] = job.request.resolved["task"]
        stats.update(output_stats)  # video: frames, fps, the decode's seconds and peak memory
        return Result(True, images, stats, latent=outcome.sample)

    # ------------------------------------------------------------------------------------------ all ranks

    def _send(self, op: int, body: bytes):
        if self.info is None:
            return
        self.header[0], self.header[1] = op, len(body)
        collective("broadcast", dist.broadcast, self.header, 0, info=self.info)
        if body:
            if len(body) > self.payload.numel():
                self.payload = torch.zeros(len(body), dtype=torch.uint8, device=self.device)
            self.payload[: len(body)].copy_(torch.frombuffer(bytearray(body), dtype=torch.uint8))
            collective("broadcast", dist.broadcast, self.payload[: len(body)], 0, info=self.info)

    def _follow(self):
        while True:
            collective("broadcast", dist.broadcast, self.header, 0, info=self.info)
            op, n = (int(v) for v in self.header.tolist())
            if op == SHUTDOWN:
                distributed.teardown(self.info)
                self._say_stopped()
                return
            if op != STEP:
                continue
            cancel, admit = [], []
            if n:
                if n > self.payload.numel():
                    self.payload = torch.zeros(n, dtype=torch.uint8, device=self.device)
                collective("broadcast", dist.broadcast, self.payload[:n], 0, info=self.info)
                body = bytes(self.payload[:n].cpu().numpy())
                line, _, wires = body.partition(b"\n")
                head, lo = json.loads(line), 0
                cancel = head["cancel"]
                for key, cancellable, length in head["admit"]:
                    admit.append((key, cancellable, Request.from_wire(wires[lo: lo + length])))
                    lo += length
            self._advance(cancel, admit)

    def _advance(self, cancel: list, admit: list) -> list:
        """One step on every rank: cancel, prepare the admitted requests (key, cancellable, Request), schedule,
        execute, update. Returns [(key, SampleOutput or the exception it ended with)] of the requests that left."""
        finished = []
        for key in cancel:
            if key in self.batch:
                self.batch.drop(key)
                finished.append((key, Cancelled("at a step boundary")))
            else:
                self.ready = [r for r in self.ready if r.key != key]
                finished.append((key, Cancelled("before it started")))
        for key, cancellable, request in admit:
            event = self.jobs[key].cancel if self.rank == 0 else (threading.Event() if cancellable else None)
            try:
                prepared = self._prepare(request)
            except ValueError as e:  # RequestError included: bad input the loaded model found
                finished.append((key, e))
                continue
            if self.rank == 0:
                self.jobs[key].prepared = prepared
            self.ready.append(_Ready(key, request, prepared, event))
        finished += self._schedule()
        if len(self.batch):
            finished += self.batch.step()
        self.served += sum(1 for _, outcome in finished if not isinstance(outcome, Exception))
        return finished

    def _prepare(self, request: Request):
        prepared = self.service.prepare(request)
        if self.layout.cfg > 1 and not guided(self.service.model, prepared.model_kwargs):
            raise RequestError(f"this server splits classifier-free guidance across ranks (--cfg-parallel "
                               f"{self.layout.cfg}); requests must use guidance (guidance_scale > 1, a negative "
                               f"prompt with true_cfg_scale for Flux)")
        return prepared

    def _schedule(self) -> list:
        """Move ready requests into the batch, in order, while they can share its calls and their rows fit (an
        empty batch takes any request; a full one shrinks n under the "shrink" policy). A request that cannot share
        model calls at all runs alone once the batch is empty."""
        world, finished = self.sampler.ev.world, []
        while self.ready:
            head = self.ready[0]
            options, prepared = head.request.options, head.prepared
            if not options.planned:  # picard, parasolver, adaptive: rounds that depend on the data
                if not len(self.batch):
                    self.ready.pop(0)
                    finished.append((head.key, self._alone(head)))
                break
            if not self.batch.can_join(prepared.latents, prepared.model_kwargs):
                break
            steps, latent_batch = prepared.trajectory.steps, prepared.latents.shape[0]
            n = options.n(world)
            if len(self.batch):
                fits = rows(options.plan(steps, n), latent_batch, world) <= self.batch.room
                n = n if fits else degree(options, steps, latent_batch, world, self.batch.room) \
                    if self.draft_policy == "shrink" else None
            if n is None:
                break
            self.ready.pop(0)
            try:
                run = self.sampler.begin(prepared, options, n)
            except ValueError as e:
                finished.append((head.key, e))
                continue
            self.batch.add(head.key, run, rows(run.plan, latent_batch, world))
            if self.rank == 0:
                self.jobs[head.key].started = time.monotonic()
        return finished

    def _alone(self, head: _Ready):
        """Sample a request that cannot share model calls, alone (every rank); its outcome."""
        self.alone = head.key
        if self.rank == 0:
            self.jobs[head.key].started = time.monotonic()
        try:
            with torch.no_grad():
                return self.sampler.apply(head.prepared, head.request.options, cancel=head.cancel)
        except (Cancelled, ValueError) as e:  # ModelOutputError is a ValueError: the same on every rank
            return e
        finally:
            self.alone = None
