"""Helpers for the step-level batching tests (tests/test_batch.py and the 2-rank scenario of tests/engine_worker.py):
a digits service whose model evaluates every row on its own (so a request's bits cannot depend on the requests
beside it), a mix of requests, and a driver that runs them as one batch with a join, a leave and a cancel."""
import threading

import torch

from driffusion_rt import services

# Steps, modes, schedulers, seeds, prompts (so latent batches) and guidance scales mixed. Request 2 is short: it
# leaves the batch early. Request 4 joins after JOIN_AFTER engine steps; request 5 is cancelled after CANCEL_AFTER.
MIXED = [
    {"prompt": "0123", "steps": 12, "mode": "aggressive", "parallel": 2, "seed": 1},
    {"prompt": "42", "steps": 9, "mode": "conservative", "parallel": 3, "seed": 2, "scheduler": "euler",
     "guidance_scale": 2.0},
    {"prompt": "7", "steps": 3, "mode": "sequential", "seed": 3, "scheduler": "dpm++2m"},
    {"prompt": "98", "steps": 10, "mode": "aggressive", "parallel": 4, "seed": 4, "scheduler": "ddpm",
     "drafts": "extrapolate"},
    {"prompt": "5", "steps": 11, "mode": "conservative", "parallel": 2, "seed": 5, "scheduler": "unipc",
     "guidance_scale": 1.0},
    {"prompt": "31", "steps": 14, "mode": "aggressive", "parallel": 2, "seed": 6},
]
JOINER, CANCELLED, JOIN_AFTER, CANCEL_AFTER = 4, 5, 3, 4
MAX_STEPS = 500  # engine steps: far more than the mix needs
NAN_GUIDANCE = -7.0  # rows of a request with this guidance scale come out NaN


class RowwiseDigits:
    """Conditioned like the digits model (labels, a guidance scale per request or per row) but elementwise: each
    output row is a function of its own input row, timestep, label and scale through exactly rounded operations
    (products and sums), so it has the same bits whatever rows share its call. Rows with guidance NAN_GUIDANCE are
    NaN (a model failing on one request)."""
    row_scalars = True

    def __call__(self, x, t, labels=None, guidance_scale=None, **_):
        def per_row(v):
            return torch.as_tensor(v).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        s = per_row(guidance_scale)
        out = x * (0.1 + per_row(t) / 1e4) + 0.01 * per_row(labels) * s + 0.001 * x * x
        return torch.where(s == NAN_GUIDANCE, torch.nan, out)


def rowwise_service(device=torch.device("cpu")):
    service = services.load_service("digits", device)
    service.model = RowwiseDigits()
    return service


def solo(engine, specs) -> dict:
    """Each request served alone, one after another."""
    return {k: engine.generate(spec) for k, spec in enumerate(specs)}


def batched(engine, specs=MIXED, joiner=JOINER, cancelled=CANCELLED) -> tuple:
    """Every request but `joiner` submitted at once; `joiner` (if any) submitted after JOIN_AFTER engine steps;
    `cancelled` (if any) cancelled (its client left) after CANCEL_AFTER. Returns ({index: Result}, engine steps)."""
    cancels = {k: threading.Event() for k in range(len(specs))}
    futures = {k: engine.submit(spec, cancels[k]) for k, spec in enumerate(specs) if k != joiner}
    steps = 0
    while not (len(futures) == len(specs) and all(f.done() for f in futures.values())):
        assert steps < MAX_STEPS, "the batch did not finish"
        engine.step()
        steps += 1
        if steps == JOIN_AFTER and joiner is not None:
            futures[joiner] = engine.submit(specs[joiner], cancels[joiner])
        if steps == CANCEL_AFTER and cancelled is not None:
            cancels[cancelled].set()
    return {k: f.result() for k, f in futures.items()}, steps
