"""diffusers' img2img `strength` convention: where a run starts in a schedule, and the noised state it starts from.

An img2img pipeline sets the full schedule of `steps` steps, keeps its last int(steps * strength) steps (SD 1.5 /
2.1, SDXL and their inpainting pipelines truncate steps * strength to an integer; SD3 and Flux keep the float, so the
start index truncates instead: "float"), tells the scheduler where it begins (set_begin_index) and draws noise onto
the encoded image at the first kept timestep with add_noise (flow matching: scale_noise). The runtime then runs
timesteps[start:] (`sample(..., start=start)`), so plans, serial rounds and the ideal speedup cover the kept steps.

    start = start_index(scheduler, steps, strength)                  # scheduler.order included
    x = noised(scheduler, steps, start, init_latents, noise)          # what the pipeline's prepare_latents returns
    out = sample(model, scheduler, x, steps=steps, start=start, ...)
"""
import copy
import numbers

import torch

RULES = ("truncate", "float")  # int(steps * strength) kept steps (SD, SDXL) or the float (SD3, Flux)


def check_strength(strength) -> float:
    """strength as a float in (0, 1], or a ValueError naming the bad value."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the fraction of the schedule to run on the image; "
                         f"1 starts from pure noise), got {strength!r}")
    return float(strength)


def kept_steps(steps: int, strength, rule: str = "truncate") -> tuple:
    """(t_start, kept): the first kept step of a `steps`-step schedule and how many are kept, as the pipelines'
    get_timesteps computes them. ValueError when strength is out of range or keeps no step."""
    strength = check_strength(strength)
    if rule not in RULES:
        raise ValueError(f"unknown strength rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "truncate":
        t_start = max(steps - min(int(steps * strength), steps), 0)
    else:
        t_start = int(max(steps - min(steps * strength, steps), 0))
    if steps - t_start < 1:
        raise ValueError(f"strength={strength:g} with {steps} steps keeps no step to run (diffusers keeps "
                         f"{'int(steps * strength)' if rule == 'truncate' else 'steps * strength'} of them): "
                         f"raise strength or steps")
    return t_start, steps - t_start


def start_index(scheduler, steps: int, strength, rule: str = "truncate") -> int:
    """The index into scheduler.timesteps where an img2img run of this strength starts (t_start * order)."""
    return kept_steps(steps, strength, rule)[0] * int(getattr(scheduler, "order", 1))


def positioned(scheduler, steps: int, start: int, timesteps_kwargs=None):
    """A copy of the scheduler with the schedule set and its begin index at `start`, as the pipelines leave theirs
    before the loop (the scheduler given is never mutated)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, **(timesteps_kwargs or {}))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return sched


def add_noise(sched, init: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's own noising of `init` at timestep(s) t: scale_noise (flow matching) or add_noise."""
    if hasattr(sched, "scale_noise"):
        return sched.scale_noise(init, t, noise)
    if hasattr(sched, "add_noise"):
        return sched.add_noise(init, noise, t)
    raise ValueError(f"{type(sched).__name__} has neither add_noise nor scale_noise: it cannot start from an image")


def noised(scheduler, steps: int, start: int, init: torch.Tensor, noise: torch.Tensor,
           timesteps_kwargs=None) -> torch.Tensor:
    """The state at index `start`: init noised at timesteps[start] exactly as the img2img pipelines do it."""
    sched = positioned(scheduler, steps, start, timesteps_kwargs)
    t = sched.timesteps[start: start + 1].repeat(init.shape[0])
    return add_noise(sched, init, noise, t).to(init.dtype)
