"""Trajectory coefficients against diffusers' own scheduler.step, and the scheduler checks."""
import copy

import pytest
import torch
from cases import f32_exact_randn, rel_err, scheduler_cases, timesteps_kwargs
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.utils.torch_utils import randn_tensor

from driffusion_rt import Trajectory, UnsupportedScheduler

CASES = scheduler_cases()
S = 13  # odd on purpose: leading/linspace/trailing spacings round differently


def _float32_inside(case_id, dtype, step_kwargs):
    """EulerDiscreteScheduler.step casts the sample to float32 and, for v_prediction without churn, divides it by
    sigma^2 + 1 in float32: diffusers' own result is float32-accurate there, whatever the input dtype."""
    return dtype == torch.float64 and case_id.startswith("euler") and "v_prediction" in case_id and not step_kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES, ids=[c[0] for c in CASES])
def test_step_equals_scheduler_step(case_id, scheduler, step_kwargs, dtype):
    traj = Trajectory.from_scheduler(scheduler, S, timesteps_kwargs(case_id), **step_kwargs)
    ref = copy.deepcopy(scheduler)
    ref.set_timesteps(S, **(timesteps_kwargs(case_id) or {}))
    g, g_ref, g_mine = (torch.Generator().manual_seed(s) for s in (0, 1, 1))
    tol = 1e-5 if dtype == torch.float32 else (1e-6 if _float32_inside(case_id, dtype, step_kwargs) else 1e-10)
    assert torch.equal(traj.timesteps, ref.timesteps)
    for i, t in enumerate(ref.timesteps):
        x = f32_exact_randn(2, 4, 5, 3, generator=g, dtype=dtype)
        o = f32_exact_randn(2, 4, 5, 3, generator=g, dtype=dtype)
        if hasattr(ref, "scale_model_input"):
            assert rel_err(x / traj.input_divisor[i].to(dtype), ref.scale_model_input(x, t)) <= 1e-15
        expected = ref.step(o, t, x, generator=g_ref, **step_kwargs).prev_sample
        A, B, C = traj.step(i)
        mine = A * x + B * o
        if traj.noisy[i]:
            mine = mine + C * randn_tensor(x.shape, generator=g_mine, dtype=dtype)
        assert rel_err(mine, expected) <= tol, (i, float(t))
        assert traj.jump(i, i + 1) == (A, B)
    assert torch.equal(g_ref.get_state(), g_mine.get_state())  # the same number of noise draws


@pytest.mark.parametrize("case_id,scheduler,step_kwargs", CASES[:4] + CASES[-5:], ids=[c[0] for c in CASES[:4] + CASES[-5:]])
def test_scheduler_is_not_mutated(case_id, scheduler, step_kwargs):
    before = copy.deepcopy(scheduler.__dict__)
    Trajectory.from_scheduler(scheduler, 7, timesteps_kwargs(case_id), **step_kwargs)
    after = scheduler.__dict__
    assert before.keys() == after.keys()
    for k, v in before.items():
        w = after[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w or (v != v and w != w), k


def test_ddim_jump_closed_form():
    """DDIM eta = 0: x_j = sqrt(a_j) x0 + sqrt(1 - a_j) eps with x0 = (x_i - sqrt(1 - a_i) eps) / sqrt(a_i)."""
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    traj = Trajectory.from_scheduler(sched, 10)
    ac = sched.alphas_cumprod.double()
    for i, j in [(0, 3), (2, 9), (4, 10)]:
        a_i = ac[traj.timesteps[i]]
        a_j = ac[traj.timesteps[j]] if j < 10 else ac[0]  # set_alpha_to_one=False: the final alpha is alphas_cumprod[0]
        a, b = traj.jump(i, j)
        assert a == pytest.approx((a_j / a_i).sqrt().item(), rel=1e-6)
        assert b == pytest.approx(((1 - a_j).sqrt() - (a_j / a_i).sqrt() * (1 - a_i).sqrt()).item(), rel=1e-5, abs=1e-7)


def test_euler_and_flow_jumps_are_sigma_differences():
    traj = Trajectory.from_scheduler(EulerDiscreteScheduler(), 10)
    flow = Trajectory.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    for t in (traj, flow):
        a, b = t.jump(2, 7)
        assert a == 1.0 and b == pytest.approx((t.sigma[7] - t.sigma[2]).item(), rel=1e-6)


def test_ddpm_jump_is_the_k_step_posterior_mean():
    """Supplementary eq. (9): mean = [sqrt(a_t/a_s)(1 - a_s) x_t + sqrt(a_s)(1 - a_t/a_s) x0] / (1 - a_t)."""
    sched = DDPMScheduler(clip_sample=False)
    traj = Trajectory.from_scheduler(sched, 20)
    ac = sched.alphas_cumprod.double()
    i, j = 3, 8
    a_t, a_s = ac[traj.timesteps[i]], ac[traj.timesteps[j]]
    cx, c0 = (a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t), a_s.sqrt() * (1 - a_t / a_s) / (1 - a_t)
    # x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    a, b = traj.jump(i, j)
    assert a == pytest.approx((cx + c0 / a_t.sqrt()).item(), rel=1e-6)
    assert b == pytest.approx((-c0 * (1 - a_t).sqrt() / a_t.sqrt()).item(), rel=1e-6)


def test_chain_is_the_composition_of_steps():
    traj = Trajectory.from_scheduler(DDPMScheduler(clip_sample=False), 12)
    g = torch.Generator().manual_seed(0)
    x, outs, zs = torch.randn(5, dtype=torch.float64, generator=g), torch.randn(4, 5, dtype=torch.float64, generator=g), \
        torch.randn(4, 5, dtype=torch.float64, generator=g)
    y = x
    for s in range(4):
        A, B, C = traj.step(3 + s)
        y = A * y + B * outs[s] + C * zs[s]
    w, r = traj.chain(3, 4)
    assert rel_err(w[0] * x + w[1:] @ outs + r @ zs, y) <= 1e-14


@pytest.mark.parametrize("make,message", [
    (lambda: DPMSolverMultistepScheduler(), "DPMSolverMultistepScheduler is not supported"),
    (lambda: DDIMScheduler(), "clip_sample=False"),
    (lambda: DDPMScheduler(clip_sample=False, thresholding=True), "thresholding=False"),
    (lambda: DDPMScheduler(clip_sample=False, variance_type="learned_range"), "variance_type='learned_range'"),
    (lambda: DDIMScheduler(clip_sample=False, prediction_type="sample"), "prediction_type='sample'"),
    (lambda: DDIMScheduler(clip_sample=False, timestep_spacing="karras"), "timestep_spacing='karras'"),
    (lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling=False"),
])
def test_unsupported_schedulers_are_rejected_clearly(make, message):
    with pytest.raises(UnsupportedScheduler, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trajectory.from_scheduler(make(), 10)


def test_unsupported_error_lists_what_is_supported():
    with pytest.raises(UnsupportedScheduler) as e:
        Trajectory.from_scheduler(DPMSolverMultistepScheduler(), 10)
    for name in ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        assert name in str(e.value)


def test_bad_steps_and_step_options():
    sched = DDIMScheduler(clip_sample=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            Trajectory.from_scheduler(sched, bad)
    with pytest.raises(ValueError, match=r"unknown step option\(s\) \['churn'\]"):
        Trajectory.from_scheduler(sched, 10, churn=1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        Trajectory.from_scheduler(sched, 10, eta=-1.0)
