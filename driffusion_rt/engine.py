"""A persistent engine under torchrun: replicas, buffers and CUDA graphs live across requests.

Every rank loads its replica and enters the engine. Rank 0 takes requests (the Python API `Engine.generate`, or
the HTTP front in serve.py), validates each one, and sends its description to the other ranks as JSON bytes in a
tensor (no pickle on the request path); every rank then runs the same plan. A request that fails validation is
answered with an error before anything is sent; a request that fails inside sampling (a non-finite model output)
fails on every rank at the same point, is answered with an error, and the engine keeps serving. A failed collective
(a rank died or hung) is fatal: the process group cannot be trusted any more, so rank 0 reports it and exits.

    engine = Engine(services.load_service("digits", device))      # on every rank
    engine.serve(lambda eng: eng.generate({"prompt": "42", "steps": 20}))  # rank 0 runs the function; others follow
"""
import json
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .distributed import DEFAULT_TIMEOUT_S, CollectiveTimeout, default_evaluator, maybe_init_dist
from .sampler import Sampler
from .services import Limits, RequestError, request_bytes, sampling_options

# Header ops broadcast from rank 0: [op, payload bytes].
REQUEST, PING, SHUTDOWN = 1, 2, 3


@dataclass
class Result:
    """A request's outcome: images (rank 0; PIL) and stats, or an error message."""
    ok: bool
    images: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    error: str | None = None
    latent: torch.Tensor | None = None


class Engine:
    """Rank 0 serves requests; the other ranks follow. One request at a time, in submission order."""

    def __init__(self, service, limits: Limits = Limits(), timeout_s: float = DEFAULT_TIMEOUT_S,
                 cuda_graphs: bool = True, heartbeat_s: float = 2.0):
        self.info = maybe_init_dist(timeout_s)
        self.rank = self.info.rank if self.info else 0
        self.device = self.info.device if self.info else torch.device("cpu")
        self.service, self.limits, self.heartbeat_s = service, limits, heartbeat_s
        self.sampler = Sampler(service.model, default_evaluator(service.model),
                               cuda_graphs=cuda_graphs and getattr(service.model, "cuda_graphs", True))
        self.header = torch.zeros(2, dtype=torch.long, device=self.device)
        self.max_bytes = request_bytes(limits)  # JSON fields and base64 images: every rank builds the same
        self.payload = torch.zeros(self.max_bytes, dtype=torch.uint8, device=self.device)
        self.queue = queue.Queue()
        self.served = self.answered = 0  # requests sampled / answered (errors included)
        self.on_answer = None            # rank 0: called with `answered` after each queued request

    # ------------------------------------------------------------------------------------------ rank 0

    def generate(self, spec: dict) -> Result:
        """Serve one request (rank 0, on the thread that runs the engine). Never raises for a bad request."""
        try:
            body = json.dumps(self._validate(spec), sort_keys=True).encode()
        except RequestError as e:
            return Result(False, error=str(e))
        if len(body) > self.max_bytes:
            return Result(False, error=f"request is {len(body)} bytes encoded; the limit is {self.max_bytes}")
        self._send(REQUEST, body)
        return self._run(json.loads(body))

    def submit(self, spec: dict) -> Future:
        """Queue a request from any thread (e.g. an HTTP handler); the engine thread serves it in order."""
        fut = Future()
        self.queue.put((spec, fut))
        return fut

    def serve(self, main=None, stop: threading.Event | None = None):
        """Run the engine on every rank. Rank 0 runs `main(engine)` if given, else serves the queue until `stop` is
        set; then it shuts every rank down. The other ranks follow rank 0's requests until the shutdown."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._terminated)
        try:
            if self.rank != 0:
                return self._follow()
            if main is not None:
                return main(self)
            while stop is None or not stop.is_set():
                try:
                    spec, fut = self.queue.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    self._send(PING, b"")  # an idle engine still notices a dead rank
                    continue
                if fut.set_running_or_notify_cancel():
                    fut.set_result(self.generate(spec))
                self.answered += 1
                if self.on_answer is not None:
                    self.on_answer(self.answered)
        except CollectiveTimeout as e:
            print(f"driffusion_rt engine: rank {self.rank}: {e}", file=sys.stderr, flush=True)
            raise
        finally:
            if self.rank == 0:
                self.shutdown()

    def _terminated(self, signum, frame):
        """torchrun stops every rank when one fails: say so on the way out (its summary names the failed rank)."""
        print(f"driffusion_rt engine: rank {self.rank}: stopped by the launcher (signal {signum}): another rank "
              f"is hung or has died; the launcher's failure summary names it", file=sys.stderr, flush=True)
        self.header = None  # no shutdown broadcast: the group is broken
        sys.exit(128 + signum)

    def shutdown(self):
        """Rank 0: tell every rank to leave, then leave the process group (safe to call twice)."""
        if self.info is not None and self.header is not None:
            try:
                self._send(SHUTDOWN, b"")
            finally:
                import torch.distributed as dist
                dist.destroy_process_group()
                self.header = None

    # ------------------------------------------------------------------------------------------ all ranks

    def _validate(self, spec) -> dict:
        if not isinstance(spec, dict):
            raise RequestError(f"a request must be a JSON object, got {type(spec).__name__}")
        sampling_options(spec, self.limits)
        self.service.check(spec, self.limits)
        return spec

    def _send(self, op: int, body: bytes):
        if self.info is None:
            return
        import torch.distributed as dist
        from .distributed import _collective
        self.header[0], self.header[1] = op, len(body)
        _collective("broadcast", dist.broadcast, self.header, 0)
        if body:
            self.payload[: len(body)].copy_(torch.frombuffer(bytearray(body), dtype=torch.uint8))
            _collective("broadcast", dist.broadcast, self.payload[: len(body)], 0)

    def _follow(self):
        import torch.distributed as dist
        from .distributed import _collective
        while True:
            _collective("broadcast", dist.broadcast, self.header, 0)
            op, n = (int(v) for v in self.header.tolist())
            if op == SHUTDOWN:
                dist.destroy_process_group()
                return
            if op == REQUEST:
                _collective("broadcast", dist.broadcast, self.payload[:n], 0)
                self._run(json.loads(bytes(self.payload[:n].cpu().numpy())))

    def _run(self, spec: dict) -> Result:
        """Sample one validated request; every rank runs this with the same spec."""
        t0 = time.perf_counter()
        try:
            req = self.service.request(spec, self.limits)
            with torch.no_grad():
                out = self.sampler(req.scheduler, req.latent, steps=req.steps, generator=req.generator,
                                   model_kwargs=req.model_kwargs, start=req.start, blend=req.blend,
                                   **sampling_options(spec, self.limits))
        except ValueError as e:  # bad values, or a non-finite model output: the same on every rank, left together
            return Result(False, error=str(e))
        self.served += 1
        if self.rank != 0:
            return Result(True)
        images = self.service.images(out, req)
        st = out.stats
        stats = dict(mode=st.mode, parallel=st.parallel, steps=st.steps, serial_rounds=st.serial_rounds,
                     model_evals=st.model_evals, ideal_speedup=st.ideal_speedup, sample_s=st.wall_time,
                     total_s=time.perf_counter() - t0)
        stats.update(getattr(req, "output_stats", {}))  # video: frames, fps, the decode's seconds and peak memory
        return Result(True, images, stats, latent=out.sample)
