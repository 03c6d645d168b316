"""The logic of GPU-only paths, checked on CPU with fakes (tests/test_gpu.py and perf/gpu_proof.py run them for real).

Pinned noise staging (issue 14, item 2): a CPU generator's draws for a CUDA latent are written into page-locked rows
and copied asynchronously; the copies queue behind the round's model call, so a row must not be written again
before its copy ran. A fake device runs the queued copies only when an event is waited on (or at the end), as a
busy GPU would: a row rewritten too early shows up as wrong noise. Device scope (item 5): the sampler runs under
the latent's CUDA device.
"""
import contextlib

import pytest
import torch

import driffusion_rt.run as run_module
import driffusion_rt.sampler as sampler_module
from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler
from driffusion_rt.noise import PinnedStage
from driffusion_rt.arena import Rows
from driffusion_rt.run import device_scope


class FakeDevice:
    """Asynchronous copies: queued, run in order when an event recorded after them is waited on."""

    def __init__(self):
        self.queue, self.done, self.log = [], 0, []

    def copy(self, dst, src):
        self.queue.append((dst, src))
        self.log.append(("copy", src.data_ptr()))

    def run_until(self, pos):
        while self.done < pos:
            dst, src = self.queue[self.done]
            dst.copy_(src)  # reads the host row now, not when it was queued
            self.done += 1

    def event(self):
        device = self

        class Event:
            def record(self):
                self.pos = len(device.queue)
                device.log.append(("record", id(self)))

            def synchronize(self):
                device.log.append(("wait", id(self)))
                device.run_until(self.pos)
        return Event()


class CudaLikeRows:
    """Arena rows that say they live on a GPU (so the sampler stages CPU draws) but are CPU tensors."""
    is_cuda = True

    def __init__(self, t):
        self.t, self.dtype = t, t.dtype

    def __getitem__(self, i):
        return self.t[i]


class Traj:
    def __init__(self, draws):
        self.draw_dtypes = (None,) * draws


def stage_rows(stage):
    return {s.data_ptr() + r * s[0].numel() * s.element_size(): (k, r) for k, s in enumerate(stage.sets)
            for r in range(s.shape[0])}


def test_sampler_draws_never_rewrite_a_staged_row_before_its_copy_ran(monkeypatch):
    device = FakeDevice()
    rounds, per_round, shape = 6, 3, (2, 4, 4)
    lay = Rows.make(0, per_round, 1, 1)
    rows = torch.zeros(lay.rows * rounds, *shape)
    stage = PinnedStage(per_round, shape, torch.float32, event=device.event)
    writes = []

    def fake_draw(out, gen, dtype, host):
        assert host is not None, "a CPU generator with a CUDA latent must stage through pinned rows"
        writes.append((host.data_ptr(), len(device.log)))
        device.log.append(("write", host.data_ptr()))
        torch.randn(out.shape, generator=gen, dtype=dtype, out=host)
        device.copy(out, host)
        return out

    class Arena:
        def stage(self, dtype):
            return stage

    monkeypatch.setattr(run_module, "draw_noise", fake_draw)
    gen = torch.Generator().manual_seed(7)
    arena = Arena()
    for r in range(rounds):  # each round's draws land in a fresh slice of `rows`, so all of them can be checked
        arena.rows = CudaLikeRows(rows[r * lay.rows:])
        run_module.draw_round(arena, lay, Traj(per_round), range(per_round), gen)
    device.run_until(len(device.queue))

    ref = torch.Generator().manual_seed(7)
    for r in range(rounds):
        for s in range(per_round):
            assert torch.equal(rows[r * lay.rows + lay.noise + s], torch.randn(shape, generator=ref)), (r, s)
    # the protocol itself: a row is written again only after the event recorded behind its last copy was waited on
    where = stage_rows(stage)
    assert len({where[p] for p, _ in writes[:per_round]}) == per_round  # one row per draw within a round
    log = device.log
    for p, at in writes:
        before = [e for e in log[:at] if e[0] in ("copy", "record", "wait")]
        copies = [i for i, e in enumerate(before) if e == ("copy", p)]
        if not copies:
            continue
        last = copies[-1]
        records = [i for i, e in enumerate(before) if e[0] == "record" and i > last]
        assert records, f"row {where[p]} rewritten before an event was recorded behind its copy"
        assert ("wait", before[records[0]][1]) in before[records[0]:], \
            f"row {where[p]} rewritten before the event behind its copy was waited on"


def test_one_pinned_row_without_events_is_the_race_the_fake_catches():
    """The fake device is able to fail: reusing one staging row without waiting gives the wrong noise."""
    device = FakeDevice()
    out = torch.zeros(3, 4)
    host = torch.empty(4)
    gen = torch.Generator().manual_seed(1)
    for s in range(3):
        torch.randn(4, generator=gen, out=host)
        device.copy(out[s], host)
    device.run_until(len(device.queue))
    ref = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[2], ref[2]) and not torch.equal(out[0], ref[0])


def test_pinned_stage_alternates_sets_and_waits_before_reuse():
    device = FakeDevice()
    stage = PinnedStage(2, (3,), torch.float32, event=device.event)
    sets = []
    for _ in range(4):
        rows = stage.take()
        sets.append(rows.data_ptr())
        device.log.append(("write", rows.data_ptr()))
        stage.queued()
    assert sets[0] == sets[2] and sets[1] == sets[3] and sets[0] != sets[1]
    kinds = [e[0] for e in device.log]
    assert kinds == ["write", "record", "write", "record", "wait", "write", "record", "wait", "write", "record"]


def test_device_scope_is_the_latent_device():
    scope = device_scope(torch.device("cuda", 1))
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
    assert isinstance(device_scope(torch.device("cpu")), contextlib.nullcontext)


def test_the_sampler_runs_under_the_latent_device_scope(monkeypatch):
    seen = []
    real = sampler_module.device_scope

    def recording(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(sampler_module, "device_scope", recording)
    from diffusers import DDIMScheduler
    mix = GaussianMixture.random(2, shape=(1, 2, 2))
    sched = DDIMScheduler(clip_sample=False)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    for mode, kw in (("aggressive", {}), ("parasolver", dict(tolerance=0.0))):
        Sampler(GaussianMixtureModel.for_scheduler(mix, sched, 6))(sched, x, steps=6, mode=mode, parallel=2, **kw)
    assert seen == [x.device, x.device]


@pytest.mark.parametrize("seconds", [0.0, 0.002])
def test_fixed_cost_model_is_deterministic_on_cpu(seconds):
    from driffusion_rt.fixed_cost import FixedCostModel
    m = FixedCostModel(seconds)
    x, t = torch.randn(2, 3), torch.tensor([10.0, 500.0])
    assert torch.equal(m(x, t), x * (0.1 + t.view(-1, 1) / 1e4))
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        FixedCostModel(-1)
    with pytest.raises(ValueError, match="per_row must be >= 0"):
        FixedCostModel(0.0, per_row=-1)


def test_fixed_cost_model_with_guidance_combines_a_doubled_call():
    """guidance != 0: one denoiser call on the uncond and cond rows stacked, combined with the scale (a guided
    model's shape, for cfg-parallel benchmarks); its cost grows with the rows."""
    from driffusion_rt.fixed_cost import FixedCostModel
    m = FixedCostModel(0.0, per_row=0.0, guidance=3.0)
    seen = []
    m.denoiser.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    x, t = torch.randn(2, 3), torch.tensor([10.0, 500.0])
    base = 0.1 + t.view(-1, 1) / 1e4
    uncond, cond = x * base, x * (base + 0.01)
    assert torch.allclose(m(x, t), uncond + 3.0 * (cond - uncond)) and seen == [4]
