"""Shared test fixtures: every supported scheduler configuration, and small comparison helpers."""
import copy

import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def scheduler_cases():
    """(id, scheduler, step_kwargs) for every supported scheduler x prediction type x spacing."""
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
        ("ddpm_large-epsilon-leading", DDPMScheduler(clip_sample=False, variance_type="fixed_large", **SD_BETAS), {}),
        ("euler_churn-epsilon-linspace", EulerDiscreteScheduler(**SD_BETAS), {"s_churn": 2.0}),
        ("euler_karras-epsilon-leading", EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="leading",
                                                                **SD_BETAS), {}),
        ("flow-shift3", FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
        ("flow-dynamic", FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {}),
    ]
    return cases


def timesteps_kwargs(case_id):
    return {"mu": 0.8} if case_id == "flow-dynamic" else None


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_loop(model, scheduler, x, steps, generator=None, timesteps_kwargs=None, **step_kwargs):
    """The reference: a plain diffusers sampling loop (set_timesteps, scale_model_input, model, step)."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps, **(timesteps_kwargs or {}))
    lat = x * getattr(s, "init_noise_sigma", 1.0)
    for t in s.timesteps:
        inp = s.scale_model_input(lat, t) if hasattr(s, "scale_model_input") else lat
        out = model(inp, t.expand(len(lat)))
        lat = s.step(out, t, lat, generator=generator, **step_kwargs).prev_sample
    return lat


def f32_exact_randn(*shape, generator, dtype):
    """Random values representable in float32 (Euler/flow steps round the sample to float32 internally)."""
    return torch.randn(*shape, generator=generator).to(dtype)
