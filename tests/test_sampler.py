"""The draft-and-refine sampler against the sequential sampler, diffusers' loop and closed-form properties."""
import os

import pytest
import torch
from cases import F32_INSIDE, diffusers_loop, rel_err, scheduler_cases, timesteps_kwargs
from diffusers import DDIMScheduler

from driffusion_rt import (GaussianMixture, GaussianMixtureModel, NonFiniteOutputError, UnsupportedScheduler,
                           make_plan, sample)

CASES = scheduler_cases()
IDS = [c[0] for c in CASES]
MIX = GaussianMixture.random(3, shape=(2, 4, 4), seed=0)
F64 = torch.float64


def noise(batch=2, shape=(2, 4, 4), seed=0, dtype=F64):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gmm(scheduler, steps, case_id="", **step_kwargs):
    return GaussianMixtureModel.for_scheduler(MIX, scheduler, steps, timesteps_kwargs(case_id), **step_kwargs)


def run(model, scheduler, x, steps, mode, n, case_id="", seed=7, **step_kwargs):
    return sample(model, scheduler, x, steps=steps, mode=mode, parallel=n, generator=torch.Generator().manual_seed(seed),
                  timesteps_kwargs=timesteps_kwargs(case_id), **step_kwargs)


class Counting:
    """Wraps a model and counts its calls and evaluated rows."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        self.rows += len(x)
        return self.model(x, t, **kw)


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES, ids=IDS)
def test_n1_equals_sequential(case_id, scheduler, step_kwargs):
    steps, x = 11, noise()
    model = gmm(scheduler, steps, case_id, **step_kwargs)
    seq = run(model, scheduler, x, steps, "sequential", 1, case_id, **step_kwargs).sample
    for mode in ("aggressive", "conservative", "picard", "parasolver"):  # iterative: a window of one, exact
        out = run(model, scheduler, x, steps, mode, 1, case_id, **step_kwargs).sample
        assert rel_err(out, seq) <= 1e-12, mode


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES, ids=IDS)
def test_x_independent_model_equals_sequential_in_every_mode(case_id, scheduler, step_kwargs):
    steps, x = 10, noise()
    field = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)

    def model(x_in, t):  # depends on t only: drafts cannot change what the refine sees
        return torch.cos(t.to(F64) / 97.0)[:, None, None, None] * field + 0.1 * t.to(F64)[:, None, None, None] / 1000

    seq = run(model, scheduler, x, steps, "sequential", 1, case_id, **step_kwargs).sample
    for mode in ("aggressive", "conservative"):
        for n in (2, 3, 4, 8):
            out = run(model, scheduler, x, steps, mode, n, case_id, **step_kwargs).sample
            assert rel_err(out, seq) <= 1e-10, (mode, n)
    for mode in ("picard", "parasolver"):  # windows of n, iterated to tolerance 0
        for n in (2, 4):
            out = run(model, scheduler, x, steps, mode, n, case_id, tolerance=0.0, **step_kwargs).sample
            assert rel_err(out, seq) <= 1e-10, (mode, n)


@pytest.mark.parametrize("steps,n,aggressive,conservative", [(50, 4, 14, 20), (50, 2, 26, 34), (28, 4, 8, 12)])
def test_critical_paths_counted_by_the_sampler(steps, n, aggressive, conservative):
    sched = DDIMScheduler(clip_sample=False)
    for mode, expected in (("aggressive", aggressive), ("conservative", conservative)):
        model = Counting(gmm(sched, steps))
        out = sample(model, sched, noise(batch=3), steps=steps, mode=mode, parallel=n)
        st = out.stats
        assert st.serial_rounds == expected == model.calls == len(st.batch_widths)
        assert st.model_evals == steps and model.rows == 3 * steps and sum(st.batch_widths) == steps
        assert max(st.batch_widths) == n
        assert st.ideal_speedup == pytest.approx(steps / expected)
        assert st.wall_time > 0 and set(st.phases) >= {"draft", "model", "refine"}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES, ids=IDS)
def test_sequential_equals_the_diffusers_loop(case_id, scheduler, step_kwargs, dtype):
    steps, x = 9, noise(dtype=dtype)
    model = gmm(scheduler, steps, case_id, **step_kwargs)
    ref = diffusers_loop(model, scheduler, x, steps, torch.Generator().manual_seed(7), timesteps_kwargs(case_id),
                         **step_kwargs)
    out = run(model, scheduler, x, steps, "sequential", 1, case_id, **step_kwargs).sample
    # Euler, flow-matching and DPM-Solver steps round the sample to float32 inside diffusers, so their float64
    # loop is float32-accurate; everything else must agree to float64 rounding.
    tol = 1e-5 if dtype == torch.float32 else (1e-6 if case_id.startswith(F32_INSIDE) else 1e-10)
    assert out.dtype == dtype and rel_err(out, ref) <= tol


# Measured relative deviation ||x_parallel - x_seq|| / ||x_seq||: Gaussian mixture (6 components, 4x8x8),
# DDIM 50 steps (SD betas), 8 samples, float64.
PINNED = {("aggressive", 2): 9.5196e-04, ("aggressive", 4): 3.9239e-03, ("aggressive", 8): 1.1709e-02,
          ("conservative", 2): 4.3952e-04, ("conservative", 4): 2.9574e-03, ("conservative", 8): 6.3812e-03}


def test_gaussian_mixture_deviation_from_sequential_is_small_and_grows_with_n():
    mix = GaussianMixture.random(6, shape=(4, 8, 8), seed=1)
    sched = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = GaussianMixtureModel.for_scheduler(mix, sched, 50)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    seq = sample(model, sched, x, steps=50, mode="sequential").sample
    for mode in ("aggressive", "conservative"):
        devs = []
        for n in (2, 4, 8):
            out = sample(model, sched, x, steps=50, mode=mode, parallel=n).sample
            devs.append(((out - seq).norm() / seq.norm()).item())
            assert devs[-1] == pytest.approx(PINNED[(mode, n)], rel=1e-3), (mode, n, devs[-1])
        assert devs[0] < devs[1] < devs[2] < 5e-2
    # the samples land on the mixture's components like the sequential ones do
    assert torch.equal(mix.classify(out), mix.classify(seq))


def test_float32_tracks_float64():
    sched = DDIMScheduler(clip_sample=False)
    model = gmm(sched, 20)
    x = noise()
    a = sample(model, sched, x, steps=20, mode="aggressive", parallel=4).sample
    b = sample(model, sched, x.float(), steps=20, mode="aggressive", parallel=4).sample
    assert b.dtype == torch.float32 and rel_err(b.double(), a) <= 1e-5


def test_model_kwargs_are_tiled_to_the_draft_batch():
    sched = DDIMScheduler(clip_sample=False)
    seen = []

    def model(x, t, cond, extra):
        seen.append((len(x), cond.shape[0], extra["pooled"].shape[0], extra["scale"]))
        return torch.zeros_like(x) + cond.mean()

    cond = torch.randn(2, 3, dtype=F64)
    sample(model, sched, noise(), steps=6, mode="aggressive", parallel=3,
           model_kwargs={"cond": cond, "extra": {"pooled": torch.ones(2, 5), "scale": 7.5}})
    assert seen and all(n == c == p for n, c, p, _ in seen) and all(s == 7.5 for *_, s in seen)
    assert {n for n, *_ in seen} == {2, 6, 4}  # anchor (2 rows), drafts 1-3 (6), drafts 4-5 (4)


def test_shared_kwargs_are_passed_unwrapped_and_never_repeated():
    from driffusion_rt import Shared
    sched = DDIMScheduler(clip_sample=False)
    ids = torch.arange(6.0).view(2, 3)  # first dim equals the batch by chance
    seen = []

    def model(x, t, ids, cond):
        seen.append((ids.shape, cond.shape[0], len(x)))
        return torch.zeros_like(x)

    sample(model, sched, noise(), steps=6, mode="aggressive", parallel=3,
           model_kwargs={"ids": Shared(ids), "cond": torch.ones(2, 4)})
    assert all(s == (2, 3) and c == n for s, c, n in seen) and {n for *_, n in seen} == {2, 6, 4}


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="fast"), "unknown mode 'fast'"),
    (dict(parallel=0), "parallel must be an integer >= 1, got 0"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(scheduler=DDIMScheduler()), "DDIMScheduler has clip_sample=True"),
    (dict(generator=[torch.Generator()]), "generator must be one torch.Generator"),
    (dict(eta=0.5, scheduler="euler"), r"unknown step option\(s\) \['eta'\]"),
])
def test_bad_input_fails_before_any_work(kwargs, message):
    from diffusers import EulerDiscreteScheduler
    sched = kwargs.pop("scheduler", DDIMScheduler(clip_sample=False))
    sched = EulerDiscreteScheduler() if sched == "euler" else sched
    model = Counting(lambda x, t: torch.zeros_like(x))
    args = dict(steps=10, mode="aggressive", parallel=2) | kwargs
    with pytest.raises((ValueError, UnsupportedScheduler), match=message):
        sample(model, sched, noise(), **args)
    assert model.calls == 0


def test_wrong_output_shape_is_reported():
    sched = DDIMScheduler(clip_sample=False)
    with pytest.raises(ValueError, match=r"model output shape \(2, 2, 4\) differs from its input \(2, 2, 4, 4\) \(timesteps \[900\]\)"):
        sample(lambda x, t: x[..., 0], sched, noise(), steps=10, mode="aggressive", parallel=2)


def test_non_finite_output_names_round_and_timestep():
    sched = DDIMScheduler(clip_sample=False)
    traj_t = make_plan("conservative", 10, 2)
    bad_t = 500  # DDIM leading spacing, 10 steps: timesteps 900, 800, ..., 0; index 4

    def model(x, t):
        out = torch.zeros_like(x)
        out[t == bad_t] = float("nan")
        return out

    with pytest.raises(NonFiniteOutputError, match=r"round 1 at timestep 500 \(trajectory index 4 of 10\)"):
        sample(model, sched, noise(), steps=10, mode="conservative", parallel=2)
    assert traj_t.rounds[1].anchor == 3 and 4 in traj_t.rounds[1].drafts


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_same_result_with_fused_kernels_on_and_off(mode, device):
    """The Triton backend where it can run: compiled on CUDA tensors (DRIFFUSION_TEST_GPU=1, the `device` fixture),
    or on CPU tensors through the interpreter (TRITON_INTERPRET=1, tests/conftest.py's default); a compiled
    Triton cannot take host pointers."""
    from driffusion_rt import kernels
    from diffusers import DDPMScheduler
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs CUDA tensors (DRIFFUSION_TEST_GPU=1) or TRITON_INTERPRET=1 on CPU")
    sched = DDPMScheduler(clip_sample=False)
    model = gmm(sched, 16)
    x = noise(dtype=torch.float32).to(device)
    results = []
    for name in ("triton", "torch"):
        with kernels.backend(name):
            results.append(run(model, sched, x, 16, mode, 4).sample)
    assert rel_err(results[0], results[1]) <= 1e-6
