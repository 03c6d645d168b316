"""Shared test fixtures: scheduler configurations (every class and option the runtime is tested with), and small
comparison helpers."""
import copy

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler, PNDMScheduler, SASolverScheduler,
                       TCDScheduler, UniPCMultistepScheduler)

from driffusion_rt.noise import draw_noise
from driffusion_rt.requests import NO_LIMITS, parse

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def single_step_cases():
    """(id, scheduler, step_kwargs) for the history-free schedulers x prediction type x spacing."""
    cases = []
    for pred in ("epsilon", "v_prediction"):
        for sp in ("leading", "trailing", "linspace"):
            base = dict(prediction_type=pred, timestep_spacing=sp, **SD_BETAS)
            cases += [
                (f"ddim-{pred}-{sp}", DDIMScheduler(clip_sample=False, steps_offset=1, **base), {}),
                (f"ddim_eta-{pred}-{sp}", DDIMScheduler(clip_sample=False, **base), {"eta": 0.6}),
                (f"ddpm-{pred}-{sp}", DDPMScheduler(clip_sample=False, **base), {}),
                (f"euler-{pred}-{sp}", EulerDiscreteScheduler(**base), {}),
            ]
    cases += [
        ("ddim-sample", DDIMScheduler(clip_sample=False, prediction_type="sample", **SD_BETAS), {}),
        ("ddpm_large-epsilon-leading", DDPMScheduler(clip_sample=False, variance_type="fixed_large", **SD_BETAS), {}),
        ("euler_churn-epsilon-linspace", EulerDiscreteScheduler(**SD_BETAS), {"s_churn": 2.0}),
        ("euler_karras-epsilon-leading", EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="leading",
                                                                **SD_BETAS), {}),
        ("euler_a-epsilon", EulerAncestralDiscreteScheduler(**SD_BETAS), {}),
        ("euler_a-v_prediction-trailing", EulerAncestralDiscreteScheduler(prediction_type="v_prediction",
                                                                          timestep_spacing="trailing", **SD_BETAS), {}),
        ("lcm", LCMScheduler(**SD_BETAS), {}),
        ("tcd", TCDScheduler(**SD_BETAS), {"eta": 0.3}),
        ("flow-shift3", FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
        ("flow-dynamic", FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {}),
    ]
    return cases


def multistep_cases():
    """(id, scheduler, step_kwargs) for schedulers with registers (history), Heun-type two-call steps and SDE ones."""
    dpm = []
    for order in (1, 2, 3):
        for algo in ("dpmsolver++", "dpmsolver"):
            final = "zero" if algo == "dpmsolver++" else "sigma_min"  # diffusers allows zero with ++ only
            dpm.append((f"dpm{order}-{algo}", DPMSolverMultistepScheduler(
                solver_order=order, algorithm_type=algo, final_sigmas_type=final, **SD_BETAS), {}))
    dpm += [
        ("dpm2-karras", DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD_BETAS), {}),
        ("dpm2-exponential", DPMSolverMultistepScheduler(use_exponential_sigmas=True, **SD_BETAS), {}),
        ("dpm2-beta", DPMSolverMultistepScheduler(use_beta_sigmas=True, **SD_BETAS), {}),
        ("dpm3-no_lower_order_final", DPMSolverMultistepScheduler(solver_order=3, lower_order_final=False,
                                                                  final_sigmas_type="sigma_min", **SD_BETAS), {}),
        ("dpm2-v_prediction", DPMSolverMultistepScheduler(prediction_type="v_prediction", **SD_BETAS), {}),
        ("dpm2-flow", DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=3.0), {}),
        ("dpm2-sde", DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **SD_BETAS), {}),
        ("dpm_single2", DPMSolverSinglestepScheduler(**SD_BETAS), {}),
    ]
    return dpm + [
        ("unipc-bh1", UniPCMultistepScheduler(solver_type="bh1", final_sigmas_type="sigma_min", **SD_BETAS), {}),
        ("unipc-bh2", UniPCMultistepScheduler(solver_type="bh2", **SD_BETAS), {}),
        ("unipc-no_corrector", UniPCMultistepScheduler(disable_corrector=[0, 1, 2, 3, 4, 5, 6], **SD_BETAS), {}),
        ("unipc-flow", UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                               flow_shift=3.0), {}),
        ("pndm-skip_prk", PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD_BETAS), {}),
        ("pndm-prk", PNDMScheduler(**SD_BETAS), {}),
        ("deis", DEISMultistepScheduler(**SD_BETAS), {}),
        ("lms", LMSDiscreteScheduler(**SD_BETAS), {}),
        ("heun", HeunDiscreteScheduler(**SD_BETAS), {}),
        ("kdpm2", KDPM2DiscreteScheduler(**SD_BETAS), {}),
        ("kdpm2_a", KDPM2AncestralDiscreteScheduler(**SD_BETAS), {}),
        ("sasolver", SASolverScheduler(**SD_BETAS), {}),
    ]


def scheduler_cases():
    return single_step_cases() + multistep_cases()


# Schedulers whose step() casts the sample to float32 (diffusers' own code): their float64 loop is only
# float32-accurate, so float64 comparisons with them use float32-level tolerances.
F32_INSIDE = ("euler", "flow", "dpm1", "dpm2", "dpm3")  # Euler, Euler ancestral, flow matching, DPM-Solver


def timesteps_kwargs(case_id):
    return {"mu": 0.8} if case_id == "flow-dynamic" else None


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_loop(model, scheduler, x, steps, generator=None, timesteps_kwargs=None, start=0, **step_kwargs):
    """The reference: a plain diffusers sampling loop (set_timesteps, scale_model_input, model, step); with start=k
    the img2img loop (set_begin_index(k), timesteps[k:], x already the state at k)."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps, **(timesteps_kwargs or {}))
    lat = x * getattr(s, "init_noise_sigma", 1.0) if start == 0 else x
    if start and hasattr(s, "set_begin_index"):
        s.set_begin_index(start)
    kw = {"generator": generator} if "generator" in s.step.__code__.co_varnames else {}
    for t in s.timesteps[start:]:
        inp = s.scale_model_input(lat, t) if hasattr(s, "scale_model_input") else lat
        out = model(inp, t.expand(len(lat)))
        lat = s.step(out, t, lat, **kw, **step_kwargs).prev_sample
    return lat


def maps_loop(traj, model, x, generator=None):
    """The probed maps run as a sequential loop (trajectory.apply), noise drawn in the scheduler's order."""
    lat, h = x * traj.init_noise_sigma, []
    for i, m in enumerate(traj.maps):
        out = model(lat / traj.input_divisor[i].to(lat.dtype), traj.timesteps[i].expand(len(lat)))
        zs = [draw_noise(torch.empty_like(lat), generator, traj.draw_dtypes[q])
              for q in range(m.first_draw, m.first_draw + m.draws)]
        lat, h = traj.apply(i, lat, out, h, zs)
    return lat


def f32_exact_randn(*shape, generator, dtype):
    """Random values representable in float32 (Euler/flow steps round the sample to float32 internally)."""
    return torch.randn(*shape, generator=generator).to(dtype)


def check_request(model, spec: dict, limits=NO_LIMITS) -> dict:
    """The resolved values of a request validated for `model` (a ModelRef or a loaded service) as parse gives
    them, before the loaded model's own checks."""
    return dict(parse(spec, model, limits).resolved)


def loaded_check(service, spec: dict, limits=NO_LIMITS) -> dict:
    """The resolved values of a request once the loaded service admitted it (what the engine serves)."""
    return dict(service.admit(parse(spec, service, limits)).resolved)
