"""Probed trajectories against diffusers' own scheduler loops, closed forms, and the scheduler checks."""
import copy

import pytest
import torch
from cases import (F32_INSIDE, SD_BETAS, diffusers_loop, maps_loop, multistep_cases, rel_err, scheduler_cases,
                   single_step_cases, timesteps_kwargs)
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

from driffusion_rt import Trajectory, UnsupportedScheduler
from driffusion_rt.trajectory import perfect_run

CASES = scheduler_cases()
IDS = [c[0] for c in CASES]
S = 9
F64 = torch.float64


def field_model(seed=3, shape=(2, 3, 4)):
    """A model whose output depends on x and t (nonlinearly), the same function for every caller."""
    field = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return lambda x, t: (torch.tanh(x) * 0.5 + field.to(x.dtype) * torch.cos(t.to(F64) / 300).to(x.dtype)
                         .view(-1, *[1] * (x.dim() - 1)))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES, ids=IDS)
def test_probed_maps_reproduce_the_diffusers_loop(case_id, scheduler, step_kwargs, dtype):
    """The probed weights, run as a sequential loop, equal the scheduler's own loop, noise draws included."""
    traj = Trajectory.from_scheduler(scheduler, S, timesteps_kwargs(case_id), **step_kwargs)
    model = field_model()
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    g_ref, g_mine = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = diffusers_loop(model, scheduler, x, S, g_ref, timesteps_kwargs(case_id), **step_kwargs)
    mine = maps_loop(traj, model, x, g_mine)
    tol = 1e-5 if dtype == torch.float32 else (1e-6 if case_id.startswith(F32_INSIDE) else 1e-12)
    assert mine.dtype == dtype and rel_err(mine, ref) <= tol
    assert torch.equal(g_ref.get_state(), g_mine.get_state())  # the same number of noise draws


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES, ids=IDS)
def test_model_input_and_timesteps_are_the_schedulers(case_id, scheduler, step_kwargs):
    traj = Trajectory.from_scheduler(scheduler, S, timesteps_kwargs(case_id), **step_kwargs)
    ref = copy.deepcopy(scheduler)
    ref.set_timesteps(S, **(timesteps_kwargs(case_id) or {}))
    assert torch.equal(traj.timesteps, ref.timesteps) and traj.steps == len(ref.timesteps)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    if hasattr(ref, "scale_model_input"):
        lat = x
        for i, t in enumerate(ref.timesteps):
            assert rel_err(lat / traj.input_divisor[i], ref.scale_model_input(lat, t)) <= 1e-15
            lat = ref.step(torch.zeros_like(lat), t, lat, **step_kwargs).prev_sample


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES[:4] + multistep_cases()[-12:],
                         ids=IDS[:4] + [c[0] for c in multistep_cases()[-12:]])
def test_scheduler_is_not_mutated(case_id, scheduler, step_kwargs):
    before = copy.deepcopy(scheduler.__dict__)
    Trajectory.from_scheduler(scheduler, 7, timesteps_kwargs(case_id), **step_kwargs)
    after = scheduler.__dict__
    assert before.keys() == after.keys()
    for k, v in before.items():
        w = after[k]
        if isinstance(v, torch.Tensor) or hasattr(v, "shape"):  # tensors and numpy arrays (NaN where unused)
            torch.testing.assert_close(torch.as_tensor(w), torch.as_tensor(v), rtol=0, atol=0, equal_nan=True)
        else:
            assert v == w or (v != v and w != w), k


@pytest.mark.parametrize("make,registers,steps", [
    (lambda: DDIMScheduler(clip_sample=False), 0, 9),
    (lambda: DPMSolverMultistepScheduler(**SD_BETAS), 1, 9),            # the previous converted output
    (lambda: DPMSolverMultistepScheduler(solver_order=3, **SD_BETAS), 2, 9),
    (lambda: UniPCMultistepScheduler(**SD_BETAS), 3, 9),                # outputs and the corrected sample
    (lambda: PNDMScheduler(skip_prk_steps=True, **SD_BETAS), 3, 10),     # ets; one repeated timestep
], ids=["ddim", "dpm2m", "dpm3m", "unipc", "pndm"])
def test_registers_and_calls_per_scheduler(make, registers, steps):
    traj = Trajectory.from_scheduler(make(), 9)
    assert max(m.registers for m in traj.maps) == registers and traj.steps == steps
    assert traj.history_free == (registers == 0) and traj.registers(0) == 0


def test_pndm_repeats_a_timestep_and_heun_calls_twice():
    pndm = Trajectory.from_scheduler(PNDMScheduler(skip_prk_steps=True, **SD_BETAS), 10)
    assert pndm.steps == 11 and pndm.timesteps[1] == pndm.timesteps[2]
    from diffusers import HeunDiscreteScheduler
    heun = Trajectory.from_scheduler(HeunDiscreteScheduler(**SD_BETAS), 10)
    assert heun.steps == 19 and heun.num_inference_steps == 10


def _held(traj, i, j):
    """The chain from anchor i to j with every output held at the anchor's: weights of ("x", i) and "o"."""
    (w,), _ = traj.express(i, [j], output=lambda l: {"o": 1.0})
    return w.get(("x", i), 0.0), w.get("o", 0.0)


def test_held_chain_is_the_ddim_jump():
    """DDIM eta = 0: x_j = sqrt(a_j) x0 + sqrt(1 - a_j) eps with x0 = (x_i - sqrt(1 - a_i) eps) / sqrt(a_i)."""
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    traj = Trajectory.from_scheduler(sched, 10)
    ac = sched.alphas_cumprod.double()
    for i, j in [(0, 3), (2, 9), (4, 10)]:
        a_i = ac[traj.timesteps[i]]
        a_j = ac[traj.timesteps[j]] if j < 10 else ac[0]  # set_alpha_to_one=False: the final alpha is alphas_cumprod[0]
        a, b = _held(traj, i, j)
        assert a == pytest.approx((a_j / a_i).sqrt().item(), rel=1e-6)
        assert b == pytest.approx(((1 - a_j).sqrt() - (a_j / a_i).sqrt() * (1 - a_i).sqrt()).item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("make", [lambda: EulerDiscreteScheduler(**SD_BETAS),
                                  lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)], ids=["euler", "flow"])
def test_held_chain_is_a_sigma_difference(make):
    """Euler (epsilon) and flow matching: the paper's jump x_j = x_i + (sigma_j - sigma_i) o_i."""
    sched = make()
    traj = Trajectory.from_scheduler(sched, 10)
    sig = copy.deepcopy(sched)
    sig.set_timesteps(10)
    for i, j in [(2, 7), (0, 10), (5, 6)]:
        a, b = _held(traj, i, j)
        assert a == 1.0 and b == pytest.approx((sig.sigmas[j] - sig.sigmas[i]).item(), rel=1e-6)


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES[::3], ids=IDS[::3])
def test_express_is_the_composition_of_steps(case_id, scheduler, step_kwargs):
    """express(i, [j]) with the actual outputs equals applying the steps i..j-1 one by one (float64)."""
    traj = Trajectory.from_scheduler(scheduler, 12, timesteps_kwargs(case_id), **step_kwargs)
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(5, dtype=F64, generator=g)  # noqa: E731
    outs = [rnd() for _ in range(traj.steps)]
    zs = [rnd() for _ in range(traj.draws)]
    x, h = rnd(), []
    for i in range(4):  # reach anchor 4 with its registers
        m = traj.maps[i]
        x, h = traj.apply(i, x, outs[i], h, zs[m.first_draw: m.first_draw + m.draws])
    (w,), regs = traj.express(4, [9], registers_at=9)
    value = {("x", 4): x, **{("h", k): v for k, v in enumerate(h)}, **{("o", l): o for l, o in enumerate(outs)},
             **{("z", q): z for q, z in enumerate(zs)}}
    for i in range(4, 9):
        m = traj.maps[i]
        x, h = traj.apply(i, x, outs[i], h, zs[m.first_draw: m.first_draw + m.draws])
    assert rel_err(sum(c * value[k] for k, c in w.items()), x) <= 1e-12
    assert len(regs) == len(h) and all(rel_err(sum(c * value[k] for k, c in r.items()), v) <= 1e-12
                                       for r, v in zip(regs, h) if v.abs().max() > 0)


# Where a perfect model's run stays on the told levels by construction. Not: DDIM with linspace/trailing spacing
# (its step lands at t - T//S, between listed timesteps), DDPM fixed_large and Euler churn (their noise is larger
# than the level change), LCM/TCD (consistency steps), sample prediction with a noisy step.
EXACT_LEVELS = [c for c in CASES if not (("linspace" in c[0] or "trailing" in c[0]) and c[0].startswith("ddim")) and
                not c[0].startswith(("ddpm_large", "euler_churn", "lcm", "tcd", "ddim-sample"))]


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", EXACT_LEVELS, ids=[c[0] for c in EXACT_LEVELS])
def test_a_perfect_model_stays_on_the_scheduler_levels(case_id, scheduler, step_kwargs):
    """A perfect model's run (noise draws as independent noises) lands on the levels derived from the scheduler's
    tables at every index: a joint check of the probed maps and the levels the Gaussian-mixture model is told."""
    traj = Trajectory.from_scheduler(scheduler, 20, timesteps_kwargs(case_id), **step_kwargs)
    run = perfect_run(traj)
    for i, (a, s) in enumerate(run[:-1]):
        assert a == pytest.approx(float(traj.alpha[i]), rel=2e-4, abs=1e-6), i
        assert s == pytest.approx(float(traj.sigma[i]), rel=2e-4, abs=1e-6), i
    assert (float(traj.alpha[-1]), float(traj.sigma[-1])) == run[-1]


@pytest.mark.parametrize("case_id,scheduler,step_kwargs",
                         [c for c in CASES if c[0] in ("ddim-epsilon-leading", "ddpm-epsilon-leading",
                                                         "euler-epsilon-leading", "dpm2-dpmsolver++", "unipc-bh2",
                                                         "euler_a-epsilon")],
                         ids=["ddim", "ddpm", "euler", "dpm2m", "unipc", "euler_a"])
@pytest.mark.parametrize("start", [3, 6])
def test_start_reproduces_the_full_loop_with_noise(case_id, scheduler, step_kwargs, start):
    """diffusers' own "full loop with noise" test: add_noise at timesteps[start], then the loop from there
    (set_begin_index), against the trajectory probed from `start`."""
    traj = Trajectory.from_scheduler(scheduler, 10, start=start, **step_kwargs)
    ref_sched = copy.deepcopy(scheduler)
    ref_sched.set_timesteps(10)
    clean = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    x = ref_sched.add_noise(clean, noise, ref_sched.timesteps[start: start + 1])
    model = field_model()
    ref = diffusers_loop(model, scheduler, x, 10, torch.Generator().manual_seed(5), start=start, **step_kwargs)
    mine = maps_loop(traj, model, x, torch.Generator().manual_seed(5))
    assert traj.steps == 10 - start and traj.init_noise_sigma == 1.0
    assert rel_err(mine, ref) <= (1e-6 if case_id.startswith(F32_INSIDE) else 1e-12)


class SquaringDDIM(DDIMScheduler):
    """A scheduler whose step is nonlinear in the model output (and has no config flag saying so)."""

    def step(self, model_output, timestep, sample, eta=0.0, generator=None, return_dict=True):
        return super().step(model_output * model_output.abs(), timestep, sample, eta=eta, generator=generator,
                            return_dict=return_dict)


@pytest.mark.parametrize("make,message", [
    (lambda: DDIMScheduler(), "clip_sample=True.*clip_sample=False"),
    (lambda: DDPMScheduler(clip_sample=False, thresholding=True), "thresholding=False"),
    (lambda: DPMSolverMultistepScheduler(thresholding=True), "DPMSolverMultistepScheduler has thresholding=True"),
    (lambda: DDPMScheduler(clip_sample=False, variance_type="learned_range"), "variance_type='learned_range'"),
    (lambda: SquaringDDIM(clip_sample=False), "SquaringDDIM is not affine in the model output"),
    (lambda: DDIMScheduler(clip_sample=False, timestep_spacing="karras"), r"DDIMScheduler.set_timesteps\(10\) failed"),
])
def test_nonlinear_or_broken_schedulers_are_rejected_clearly(make, message):
    with pytest.raises(UnsupportedScheduler, match=message):
        Trajectory.from_scheduler(make(), 10)


def test_not_a_scheduler():
    with pytest.raises(UnsupportedScheduler, match="not a diffusers scheduler"):
        Trajectory.from_scheduler(object(), 10)


def test_bad_steps_and_step_options():
    sched = DDIMScheduler(clip_sample=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            Trajectory.from_scheduler(sched, bad)
    with pytest.raises(ValueError, match=r"unknown step option\(s\) \['churn'\] for DDIMScheduler; allowed: "
                                         r"\['eta', 'use_clipped_model_output'\]"):
        Trajectory.from_scheduler(sched, 10, churn=1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        Trajectory.from_scheduler(sched, 10, eta=-1.0)
    with pytest.raises(ValueError, match="start=10 must be an index into the 10 timesteps"):
        Trajectory.from_scheduler(sched, 10, start=10)


def test_trajectories_are_cached_by_configuration():
    a = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 11)
    b = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 11)
    c = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False, steps_offset=1), 11)
    assert a is b and c is not a and c.key != a.key


def test_single_step_cases_are_history_free():
    for case_id, sched, kw in single_step_cases():
        traj = Trajectory.from_scheduler(sched, 6, timesteps_kwargs(case_id), **kw)
        assert traj.history_free, case_id
        A, B, C = traj.step(2)
        assert (C != 0) == traj.noisy[2]
