"""Step-level batching (driffusion_rt/batch.py, engine.py): requests that share model calls get their solo results;
joining, leaving and cancelling mid-batch; the draft-degree policy; which requests can share a call."""
import json
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from batching import CANCELLED, JOINER, MIXED, NAN_GUIDANCE, batched, rowwise_service, solo  # noqa: E402
from serving import torchrun  # noqa: E402

from driffusion_rt import services  # noqa: E402
from driffusion_rt.batch import degree, rows  # noqa: E402
from driffusion_rt.engine import Engine  # noqa: E402
from driffusion_rt.evaluator import PerStep, Shared, can_share  # noqa: E402
from driffusion_rt.options import SamplingOptions  # noqa: E402
from driffusion_rt.requests import parse  # noqa: E402

WORKER = os.path.join(HERE, "engine_worker.py")


def test_a_mixed_batch_gives_every_request_its_solo_result_bit_for_bit():
    """Steps, modes (aggressive, conservative, sequential), schedulers (stochastic too), seeds, prompts and guidance
    scales in one batch, one request joining after 3 steps, a short one leaving early, one cancelled after 4: every
    request that finishes has exactly the latent it has when served alone, and the one Sampler.apply gives."""
    service = rowwise_service()
    engine = Engine(service, max_batch=64)
    alone = solo(engine, MIXED)
    together, steps = batched(engine, MIXED)
    assert together[CANCELLED].status == 499 and engine.in_flight == 0 and engine.queued == 0
    for k, spec in enumerate(MIXED):
        assert alone[k].ok and alone[k].stats["batch_requests"] == 1, (k, alone[k].error)
        if k == CANCELLED:
            continue
        r = together[k]
        assert r.ok and torch.equal(r.latent, alone[k].latent), (k, spec)
        assert r.stats["serial_rounds"] == alone[k].stats["serial_rounds"]
        request = service.admit(parse(spec, service))
        assert torch.equal(engine.sampler.apply(service.prepare(request), request.options).sample, r.latent), k
    # they really shared calls: five from the first step; the short request (3 calls) left before the joiner came,
    # which then shared calls with the three still running (the fourth was cancelled at the joiner's first step)
    assert together[2].stats["batch_requests"] == 5 and together[0].stats["batch_requests"] == 5
    assert together[JOINER].stats["batch_requests"] >= 3 and steps > 10


def test_a_request_whose_outputs_turn_non_finite_fails_alone():
    """In a batch of three, the model's outputs are NaN on one request's rows: that request fails (500, the round
    and timestep named) and the other two get their solo results bit for bit."""
    engine = Engine(rowwise_service(), max_batch=64)
    specs = [MIXED[0], {**MIXED[1], "guidance_scale": NAN_GUIDANCE}, MIXED[3]]
    alone = solo(engine, [specs[0], specs[2]])
    together, _ = batched(engine, specs, joiner=None, cancelled=None)
    assert together[1].status == 500 and "non-finite model output in round 0" in together[1].error
    for k, ref in ((0, alone[0]), (2, alone[1])):
        assert together[k].ok and together[k].stats["batch_requests"] == 3
        assert torch.equal(together[k].latent, ref.latent)


def test_the_digits_unet_batched_differs_from_solo_by_rounding_only():
    """The real digits UNet rounds its matrix products differently for another number of rows (about 1e-6 per call
    on CPU): batched results stay within 1e-5 of the solo ones (latents in [-1, 1]) and give the same images."""
    engine = Engine(services.load_service("digits", torch.device("cpu")), max_batch=64)
    specs = MIXED[:4]
    alone = solo(engine, specs)
    together, _ = batched(engine, specs, joiner=3, cancelled=None)
    worst = 0.0
    for k in range(len(specs)):
        assert together[k].ok and together[k].stats["batch_requests"] >= 2
        worst = max(worst, (together[k].latent - alone[k].latent).abs().max().item())
        for a, b in zip(alone[k].images, together[k].images):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    print(f"\ndigits UNet, batched vs solo: max |difference| of the latents {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.slow
def test_a_mixed_batch_on_two_gloo_ranks_gives_every_request_its_solo_result(tmp_path):
    r, _ = torchrun(WORKER, "batch", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "batch.json").read_text())
    assert result["cancelled_status"] == 499
    assert json.loads((tmp_path / "rank1.json").read_text())["served"] == result["served"] == 2 * len(MIXED) - 1
    assert sorted(map(int, result["equal"])) == [k for k in range(len(MIXED)) if k != CANCELLED]
    assert all(result["equal"].values()), result
    assert result["batch_requests"][str(JOINER)] >= 3


def test_the_draft_policy_shrinks_n_while_the_batch_is_full():
    """max_batch 6 rows: a request of 2 latent rows at n = 2 (one rank: 2 drafts a call, 4 rows) leaves 2 rows; the
    next request (1 row, n = 4: 4 rows) joins with the largest n whose rows fit (2), and its stats say so. Under
    the wait policy it waits and runs alone afterwards, with its own n."""
    for policy, expect_n in (("shrink", None), ("wait", 4)):
        engine = Engine(rowwise_service(), max_batch=6, draft_policy=policy)
        first = engine.submit({"prompt": "12", "steps": 8, "parallel": 2})
        second = engine.submit({"prompt": "3", "steps": 8, "parallel": 4})
        for _ in range(100):
            if first.done() and second.done():
                break
            engine.step()
        a, b = first.result().stats, second.result().stats
        assert a["parallel"] == 2 and "parallel_requested" not in a
        if policy == "shrink":  # 6 - 4 = 2 rows free: n = 2 (2 drafts of 1 row)
            assert b["parallel"] == 2 and b["parallel_requested"] == 4 and b["batch_requests"] == 2
        else:
            assert b["parallel"] == expect_n and b["batch_requests"] == 1


def test_rows_and_degree_follow_the_plan():
    aggressive = SamplingOptions("aggressive", 4)
    assert rows(aggressive.plan(10, 4), 3, 2) == 2 * 3   # 4 drafts over 2 ranks, 3 latent rows each
    assert rows(SamplingOptions("sequential").plan(10, 4), 3, 2) == 3  # one anchor
    assert rows(SamplingOptions("conservative", 3).plan(10, 3), 1, 1) == 3
    assert degree(aggressive, 10, 3, 2, room=6) == 4
    assert degree(aggressive, 10, 3, 2, room=5) == 2 and degree(aggressive, 10, 3, 2, room=3) == 2
    assert degree(aggressive, 10, 3, 2, room=2) is None  # not even n = 1 fits
    assert degree(SamplingOptions("aggressive", 4), 10, 1, 1, room=3) == 3


class Scalars:
    row_scalars = True


def test_which_requests_can_share_a_model_call():
    x2, x3 = torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8)
    kw = lambda n, g=1.5, **more: {"labels": torch.zeros(n, dtype=torch.long), "guidance_scale": g, **more}  # noqa
    assert can_share(Scalars(), x2, kw(2), x3, kw(3, 4.0))   # latent batches and scales differ: rows
    assert not can_share(object(), x2, kw(2), x3, kw(3, 4.0))  # a model without per-row scalars
    assert can_share(object(), x2, kw(2), x3, kw(3))
    assert not can_share(Scalars(), x2, kw(2), torch.zeros(2, 1, 4, 4), kw(2))  # another per-row shape
    assert not can_share(Scalars(), x2, kw(2), x2.double(), kw(2))
    assert not can_share(Scalars(), x2, kw(2), x2, {"labels": torch.zeros(2, dtype=torch.long)})  # other keys
    table = torch.arange(10.0)
    assert can_share(Scalars(), x2, kw(2, ids=Shared(table)), x3, kw(3, ids=Shared(table.clone())))
    assert not can_share(Scalars(), x2, kw(2, ids=Shared(table)), x3, kw(3, ids=Shared(table + 1)))
    assert can_share(Scalars(), x2, kw(2, s=PerStep(torch.zeros(5, 2))), x3, kw(3, s=PerStep(torch.ones(9, 2))))
    assert not can_share(Scalars(), x2, kw(2, s=PerStep(torch.zeros(5, 2))), x3, kw(3, s=PerStep(torch.ones(9))))
