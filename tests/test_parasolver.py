"""ParaSolver and Picard iteration: exact at tolerance 0, fewer serial rounds at a positive tolerance."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from driffusion_rt import GaussianMixture, GaussianMixtureModel, sample
from driffusion_rt.parasolver import boundaries

F64 = torch.float64
MIX = GaussianMixture.random(6, shape=(4, 8, 8), seed=1)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def setup(sched, steps, batch=3):
    model = GaussianMixtureModel.for_scheduler(MIX, sched, steps)
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    return model, x


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_boundaries_are_as_equal_as_possible():
    assert boundaries(50, 50) == list(range(51))
    b = boundaries(50, 15)
    lens = [b[i + 1] - b[i] for i in range(15)]
    assert b[0] == 0 and b[-1] == 50 and max(lens) - min(lens) <= 1


@pytest.mark.parametrize("sched", [DDIMScheduler(clip_sample=False, **SD), DDPMScheduler(clip_sample=False, **SD),
                                   EulerDiscreteScheduler(**SD)], ids=["ddim", "ddpm", "euler"])
@pytest.mark.parametrize("n", [20, 10, 4])  # S, S/2, S/5
def test_tolerance_zero_reproduces_sequential(sched, n):
    steps = 20
    model, x = setup(sched, steps)
    seq = sample(model, sched, x, steps=steps, mode="sequential", generator=torch.Generator().manual_seed(5)).sample
    for m in (0, 2):
        for p in (2, 4, n):
            out = sample(model, sched, x, steps=steps, mode="parasolver", subintervals=n, preconditioning=m, window=p,
                         tolerance=0.0, generator=torch.Generator().manual_seed(5))
            assert rel(out.sample, seq) <= 1e-10, (m, p)
            st = out.stats
            assert 1 <= st.iterations <= n - m, (m, p, st.iterations)
            assert len(st.trace) == st.iterations and all(stride >= 1 for *_, stride in st.trace)
            assert st.serial_rounds == len(st.batch_widths) and max(st.batch_widths) <= p


def test_picard_is_parasolver_with_one_step_subintervals():
    sched = DDIMScheduler(clip_sample=False, **SD)
    model, x = setup(sched, 12)
    a = sample(model, sched, x, steps=12, mode="picard", window=4, tolerance=0.01)
    b = sample(model, sched, x, steps=12, mode="parasolver", subintervals=12, preconditioning=0, window=4,
               tolerance=0.01)
    assert torch.equal(a.sample, b.sample) and a.stats.serial_rounds == b.stats.serial_rounds
    assert set(a.stats.batch_widths) <= {1, 2, 3, 4}


# Measured on the Gaussian mixture (6 components, 4x8x8, 3 samples), DDIM 50 steps with SD betas, float64:
# (serial rounds, model evaluations, relative deviation from sequential)
PINNED = {("parasolver", 0.01): (20, 102, 3.4097e-04), ("parasolver", 0.05): (18, 96, 3.0004e-03),
          ("picard", 0.01): (16, 107, 1.3842e-03), ("picard", 0.05): (14, 96, 4.1808e-03)}


@pytest.mark.parametrize("mode,tol", list(PINNED))
def test_positive_tolerance_is_faster_and_close(mode, tol):
    sched = DDIMScheduler(clip_sample=False, **SD)
    model, x = setup(sched, 50)
    seq = sample(model, sched, x, steps=50, mode="sequential").sample
    kw = dict(subintervals=25, preconditioning=2) if mode == "parasolver" else {}
    out = sample(model, sched, x, steps=50, mode=mode, window=8, tolerance=tol, **kw)
    dev = rel(out.sample, seq)
    rounds, evals, pinned_dev = PINNED[(mode, tol)]
    print(f"\n{mode} tolerance {tol}: {out.stats.serial_rounds} serial rounds (sequential 50), "
          f"{out.stats.model_evals} evaluations, deviation {dev:.4e}")
    assert out.stats.serial_rounds < 50 and dev <= tol  # deviation on the tolerance's scale
    assert (out.stats.serial_rounds, out.stats.model_evals) == (rounds, evals)
    assert dev == pytest.approx(pinned_dev, rel=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(subintervals=0), "subintervals must be an integer in 1..steps=10, got 0"),
    (dict(subintervals=11), "subintervals must be an integer in 1..steps=10, got 11"),
    (dict(subintervals=5, preconditioning=5), "preconditioning must be an integer in 0..subintervals-1=4, got 5"),
    (dict(window=0), "window must be an integer >= 1, got 0"),
    (dict(tolerance=-0.1), "tolerance must be a number >= 0, got -0.1"),
    (dict(mode="picard", subintervals=5), "mode='picard' is ParaSolver with subintervals = steps = 10; got 5"),
    (dict(mode="aggressive", tolerance=0.1), r"\['tolerance'\] applies to modes picard, parasolver, adaptive only"),
])
def test_bad_parameters_fail_before_any_work(kwargs, message):
    calls = []
    sched = DDIMScheduler(clip_sample=False)
    args = dict(mode="parasolver", steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: calls.append(1) or x, sched, torch.randn(1, 2, 2), **args)
    assert not calls
