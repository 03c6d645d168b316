"""Engine scenarios on gloo, launched by tests/test_engine.py as `torchrun --nproc_per_node=2 tests/engine_worker.py ...`.

    requests OUT   20 requests, valid and invalid mixed; results and PNGs written to OUT
    memory OUT     resident memory of every rank after 10 and after 50 requests
    die WHEN       rank 1 dies while the engine is idle (WHEN=idle) or inside a request (WHEN=request)
    batch OUT      the mixed batch of tests/batching.py against each request served alone (a row-wise model)
"""
import json
import os
import sys
import time

import torch

from batching import CANCELLED, MIXED, batched, rowwise_service, solo

from driffusion_rt import services
from driffusion_rt.engine import Engine

NAN_GUIDANCE = -7.0  # a request with this guidance scale makes the test model return NaN (on every rank)


def digits_engine(**kw):
    service = services.load_service("digits", torch.device("cpu"))
    model = service.model

    def nan_on_request(x, t, labels=None, guidance_scale=None, **rest):
        out = model(x, t, labels=labels, guidance_scale=guidance_scale, **rest)
        return out * float("nan") if guidance_scale == NAN_GUIDANCE else out
    service.model = nan_on_request
    return Engine(service, timeout_s=float(os.environ.get("ENGINE_TIMEOUT", "30")), **kw)


REQUESTS = [
    {"prompt": "0123", "steps": 10, "mode": "aggressive", "parallel": 2, "seed": 1},
    {"prompt": "7", "steps": 8, "width": 64},                                    # bad size
    {"prompt": "42", "steps": 12, "mode": "conservative", "parallel": 2, "seed": 2},
    {"prompt": "5", "steps": 0},                                                 # steps < 1
    {"prompt": "5", "steps": 10, "mode": "turbo"},                               # unknown mode
    {"prompt": "", "steps": 10},                                                 # empty prompt
    {"prompt": "1", "steps": 10, "num_images": 50},                              # oversized batch
    {"prompt": "9", "steps": 10, "guidance_scale": NAN_GUIDANCE, "parallel": 2},  # non-finite model output
    {"prompt": "0123", "steps": 10, "mode": "aggressive", "parallel": 2, "seed": 1},  # repeat of the first
    {"prompt": "86", "steps": 10, "mode": "sequential", "seed": 3},
    {"prompt": "3", "steps": 10, "scheduler": "euler", "parallel": 2, "seed": 4},
    {"prompt": "12", "steps": 10, "drafts": "extrapolate", "parallel": 2, "seed": 5},
    {"prompt": "x1", "steps": 10},                                               # not a digit
    {"prompt": "6", "steps": 10, "mode": "parasolver", "window": 2, "tolerance": 0.01, "seed": 6},
    {"prompt": "0", "steps": 10, "seed": 7, "unknown_field": 1},                 # unknown field
    {"prompt": "77", "steps": 6, "mode": "conservative", "parallel": 4, "seed": 8},
    {"prompt": "1", "steps": 10, "scheduler": "flow"},                           # scheduler not for this model
    {"prompt": "2", "steps": 10, "mode": "picard", "window": 2, "tolerance": 0.05, "seed": 9},
    {"prompt": "4", "steps": 100000},                                            # over the steps limit
    {"prompt": "9876543210", "steps": 10, "seed": 10, "parallel": 2},
]


def requests(out_dir):
    engine = digits_engine()

    def main(eng):
        rows = []
        for k, spec in enumerate(REQUESTS):
            r = eng.generate(spec)
            row = {"index": k, "ok": r.ok, "error": r.error, "stats": r.stats, "status": r.status}
            if r.ok:
                r.images[0].save(os.path.join(out_dir, f"{k}.png"))
                torch.save(r.latent, os.path.join(out_dir, f"{k}.pt"))
            rows.append(row)
        rows.append({"still_serving": eng.generate({"prompt": "1", "steps": 4}).ok})
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(rows, f)
    engine.serve(main)
    if engine.rank == 1:
        with open(os.path.join(out_dir, "rank1.json"), "w") as f:
            json.dump({"served": engine.served}, f)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(out_dir):
    engine = digits_engine()
    specs = [{"prompt": "0123456789"[k % 10] * 2, "steps": 8, "parallel": 2, "seed": k,
              "mode": ("aggressive", "conservative")[k % 2]} for k in range(50)]
    marks = {}

    def main(eng):
        for k, spec in enumerate(specs, 1):
            assert eng.generate(spec).ok
            if k in (10, 50):
                marks[k] = rss_mb()
    if engine.rank == 1:  # a follower measures itself after the same requests, counted as they come
        advance = engine._advance

        def counted(*args):
            r = advance(*args)
            if engine.served in (10, 50) and engine.served not in marks:
                marks[engine.served] = rss_mb()
            return r
        engine._advance = counted
    engine.serve(main)
    with open(os.path.join(out_dir, f"rss{engine.rank}.json"), "w") as f:
        json.dump(marks, f)


def die(when):
    """Rank 1 exits (code 19) while the engine idles (rank 0 only sends heartbeats) or inside a request."""
    import threading
    engine = digits_engine(heartbeat_s=0.5)

    def exit19():
        print(f"FAULT_AT {time.time():.3f}", file=sys.stderr, flush=True)
        os._exit(19)
    if engine.rank == 1:
        if when == "idle":
            threading.Timer(3.0, exit19).start()
        else:
            prepare = engine._prepare
            engine._prepare = lambda req: exit19() if req.resolved["seed"] == 99 else prepare(req)
        return engine.serve()
    assert engine.generate({"prompt": "1", "steps": 4, "parallel": 2}).ok
    if when == "idle":
        engine.serve(stop=threading.Event())  # nothing queued: heartbeats until a collective fails
    else:
        engine.serve(lambda eng: eng.generate({"prompt": "1", "steps": 10, "parallel": 2, "seed": 99}))


def batch(out_dir):
    """Rank 0 serves each request of the mix alone, then all of them as one batch (a join, a leave, a cancel);
    the ranks write what they served and rank 0 whether each batched latent equals its solo one bit for bit."""
    engine = Engine(rowwise_service(), timeout_s=float(os.environ.get("ENGINE_TIMEOUT", "30")), max_batch=64)
    out = {}

    def main(eng):
        alone = solo(eng, MIXED)
        together, _ = batched(eng, MIXED)
        out.update(cancelled_status=together.pop(CANCELLED).status, served=eng.served,
                   equal={k: bool(r.ok and torch.equal(r.latent, alone[k].latent)) for k, r in together.items()},
                   batch_requests={k: r.stats.get("batch_requests") for k, r in together.items()})
    engine.serve(main)
    name = "batch.json" if engine.rank == 0 else f"rank{engine.rank}.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(out if engine.rank == 0 else {"served": engine.served}, f)


if __name__ == "__main__":
    {"requests": requests, "memory": memory, "die": die, "batch": batch}[sys.argv[1]](sys.argv[2])
