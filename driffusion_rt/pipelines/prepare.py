"""A pipeline request from its call arguments to what the sampler runs, in two steps (docs/design.md section 5):

    args = check(pipe, prompt, steps=..., ...)   # every check, before any model work: a frozen ImageArgs
    prepared = encode(pipe, args)                # the prompt encoded once, the initial noise drawn exactly as the
                                                 # pipeline's prepare_latents draws it, the trajectory probed
    out = run(pipe, prepared, mode=..., ...)     # through the runtime (Sampler.apply)

`prepare` is check then encode. Services build ImageArgs from a request that was validated already and call
`encode` only; the image tasks' inputs (conditioning.py) take part in both steps.
"""
import inspect
import warnings
from dataclasses import dataclass, field

import torch

from .. import schedulers as named
from ..layout import parallelize
from ..options import SamplingOptions
from ..sampler import Prepared
from ..trajectory import Trajectory, UnsupportedScheduler
from .family import (OPTIONS, REGISTRY, Family, check_sequence, component_configs, default_size, family_of,
                     get_family, model_adapter, size_multiple)


def check_size(pipe, height, width) -> tuple:
    """Validate (height, width) for this pipeline's VAE and denoiser; None picks the pipeline's default."""
    dh, dw = default_size(pipe)
    height, width = dh if height is None else height, dw if width is None else width
    mult, why = size_multiple(pipe)
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {v!r}")
        if v % mult:
            lo = v - v % mult
            hint = f"{lo} or {lo + mult}" if lo else f"{mult}"
            raise ValueError(f"{name}={v} is not a multiple of {mult}, which the {family_of(pipe)} pipeline needs "
                             f"({why}); use e.g. {hint}")
    return height, width


def prompt_batch(prompt) -> int:
    """Prompts in a call: one string, or a non-empty list of strings."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")


def pipeline_prompts(prompt, negative_prompt) -> tuple:
    """(prompt, negative_prompt) in the types the pipelines test for (lists, a negative per prompt)."""
    prompt = list(prompt) if isinstance(prompt, tuple) else prompt
    if isinstance(negative_prompt, tuple):
        negative_prompt = list(negative_prompt)
    if isinstance(prompt, list) and isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)
    return prompt, negative_prompt


def initial_noise(shape, generator, device, dtype, latents):
    """Unit noise as the pipelines' prepare_latents draws it (randn_tensor), or the given latents, shape-checked."""
    from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers takes seconds to import

    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype)
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"a list of {len(generator)} generators for a batch of {shape[0]} images")
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def check_family_options(family: Family, options: dict):
    for name, value in options.items():
        if name not in family.options and value != OPTIONS[name]:
            have = ", ".join(f.name for f in REGISTRY.values() if name in f.options)
            raise ValueError(f"{name} is not supported by the {family.name} pipeline (only {have})")


def common_args(family, generator, seed, steps, **counts) -> tuple:
    """(generator, steps) of a request: a seed becomes a CPU generator, steps default to the family's; counts
    (num_images=..., num_videos=...) must be integers >= 1. Raises ValueError naming the bad value."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    steps = family.default_steps if steps is None else steps
    for name, v in (("steps", steps), *counts.items()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return generator, steps


# ---------------------------------------------------------------------------------------------- schedulers


def make_scheduler(pipe, name: str | None = None):
    """The scheduler for a request: `name` is one of SCHEDULERS[family] (a short name of driffusion_rt.schedulers,
    built from the pipeline's scheduler config, so it keeps the checkpoint's schedule) or None: the pipeline's own
    scheduler, as shipped (with clip_sample / thresholding switched off, and a warning, if they were on: the
    runtime cannot run them). Whether the runtime can run it is decided when its trajectory is probed (encode)."""
    own, family = pipe.scheduler, get_family(pipe)
    if name is not None:
        if name not in family.schedulers:
            raise ValueError(f"scheduler {name!r} is not supported for the {family.name} family; supported: "
                             f"{', '.join(family.schedulers)}")
        return named.build(name, own.config)
    on = [k for k in named.NONLINEAR_OFF if own.config.get(k, False)]
    if not on:
        return own
    warnings.warn(f"{type(own).__name__} has {', '.join(f'{k}=True' for k in on)}, which the runtime cannot run "
                  f"(nonlinear steps); sampling with {' and '.join(f'{k}=False' for k in on)}", stacklevel=3)
    return type(own).from_config(own.config, **{k: False for k in on})


def choose_trajectory(family, sched, named_scheduler, steps, timesteps_kwargs, step_kwargs, start=0) -> tuple:
    """(scheduler, its probed trajectory from index `start`); a shipped scheduler the runtime cannot run is
    replaced by the family default, announced with a warning (a named one is an error)."""
    try:
        return sched, Trajectory.from_scheduler(sched, steps, timesteps_kwargs, start, **step_kwargs)
    except UnsupportedScheduler as e:
        if named_scheduler is not None:
            raise
        warnings.warn(f"the pipeline's {type(sched).__name__} cannot run through the runtime ({e}); using "
                      f"{family.default_scheduler!r} instead", stacklevel=3)
        sched = named.build(family.default_scheduler, sched.config)
        return sched, Trajectory.from_scheduler(sched, steps, timesteps_kwargs, start)


def step_options(sched, eta) -> dict:
    """The scheduler's step options of a request: eta for DDIM-type schedulers (ValueError for others)."""
    step_kwargs = {"eta": float(eta)} if "eta" in inspect.signature(sched.step).parameters else {}
    if eta and not step_kwargs:
        raise ValueError(f"eta is an option of DDIM-type schedulers; the scheduler is {type(sched).__name__}")
    return step_kwargs


def run_generator(generator, traj):
    """The generator the sampler draws step noise from: a list of per-image generators only seeds the latents,
    so it is refused when the scheduler draws noise at steps. Raises ValueError."""
    if not isinstance(generator, list):
        return generator
    if any(traj.noisy):
        raise ValueError(f"a list of generators works only with deterministic schedulers; "
                         f"{traj.scheduler_name} draws noise at every step: pass one torch.Generator")
    return None


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, eq=False)
class ImageArgs:
    """The checked arguments of one image request (every check done): what `encode` turns into a PreparedImage."""
    family: Family
    prompt: object                 # a string or a list of strings, as the pipelines take it
    negative_prompt: object
    steps: int
    guidance_scale: float
    height: int
    width: int
    num_images: int                # per prompt
    scheduler: object              # the scheduler instance (make_scheduler)
    scheduler_name: str | None     # the short name asked for (None: the pipeline's own, replaceable)
    generator: object = None       # one torch.Generator, a list of them (deterministic schedulers), or None
    step_kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # the family's OPTIONS
    conditioning: object = None    # an image task's inputs (conditioning.py), begun
    latents: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return prompt_batch(self.prompt) * self.num_images


@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedImage(Prepared):
    """A prepared image request (every rank prepares the same): the sampler's inputs plus what decoding needs."""
    family: str
    height: int
    width: int
    decode_generator: object = None  # the request's generator as given (a list of them, too)
    step_kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # the family's options (max_sequence_length, ...)
    inputs: dict = field(default_factory=dict)  # the image task's inputs as a request resolves them (Task.resolved)


def check(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
          num_images=1, generator=None, seed=None, scheduler=None, latents=None, eta=0.0, guidance_rescale=0.0,
          true_cfg_scale=1.0, max_sequence_length=None, clip_skip=None, lora_scale=None,
          conditioning=None) -> ImageArgs:
    """Every check of `prepare`'s arguments, before any model work (see `prepare`). Raises ValueError."""
    family = get_family(pipe)
    if family.video:
        raise ValueError(f"the {family.name} pipeline ({type(pipe).__name__}) makes videos: use text_to_video / "
                         f"prepare_video (driffusion_rt.pipelines.video)")
    generator, steps = common_args(family, generator, seed, steps, num_images=num_images)
    guidance_scale = family.default_guidance if guidance_scale is None else float(guidance_scale)
    options = dict(clip_skip=clip_skip, guidance_rescale=guidance_rescale, true_cfg_scale=true_cfg_scale,
                   max_sequence_length=max_sequence_length, lora_scale=lora_scale)
    check_family_options(family, options)
    batch = prompt_batch(prompt) * num_images
    if conditioning is not None:  # the image's size is the default, and what only the task can check
        height, width = conditioning.begin(pipe, family, height=height, width=width, steps=steps, batch=batch,
                                           num_images=num_images, latents=latents)
    height, width = check_size(pipe, height, width)
    sched = make_scheduler(pipe, scheduler)
    step_kwargs = step_options(sched, eta)
    prompt, negative_prompt = pipeline_prompts(prompt, negative_prompt)
    return ImageArgs(family, prompt, negative_prompt, steps, guidance_scale, height, width, num_images, sched,
                     scheduler, generator, step_kwargs, {name: options[name] for name in family.options},
                     conditioning, latents)


@torch.no_grad()
def encode(pipe, args: ImageArgs) -> PreparedImage:
    """Encode the prompt, draw the initial noise the way the pipeline's __call__ does and probe the trajectory
    (the scheduler the runtime cannot run is the only thing found here)."""
    family, device = args.family, pipe._execution_device
    task_inputs = {} if args.conditioning is None else args.conditioning.encode_inputs(pipe, family)
    kw = family.encode(pipe, args.prompt, args.negative_prompt, batch=args.batch, num_images=args.num_images,
                       guidance_scale=args.guidance_scale, height=args.height, width=args.width, device=device,
                       **args.options, **task_inputs)
    blend = None
    if args.conditioning is not None:
        x, sched, traj, blend = args.conditioning.prepare(
            pipe, family, kw, sched=args.scheduler, named_scheduler=args.scheduler_name, steps=args.steps,
            step_kwargs=args.step_kwargs, batch=args.batch, height=args.height, width=args.width,
            generator=args.generator, latents=args.latents, device=device)
    else:
        x, geometry = family.prepare(pipe, kw, batch=args.batch, height=args.height, width=args.width,
                                     generator=args.generator, latents=args.latents, device=device)
        kw.update(geometry)
        sched, traj = choose_trajectory(family, args.scheduler, args.scheduler_name, args.steps,
                                        family.timesteps_kwargs(pipe, args.scheduler, x, args.steps),
                                        args.step_kwargs)
    return PreparedImage(traj, x, kw, run_generator(args.generator, traj), blend, family=family.name,
                         height=args.height, width=args.width, decode_generator=args.generator,
                         step_kwargs=args.step_kwargs, options=args.options,
                         inputs={} if args.conditioning is None else args.conditioning.resolved())


def prepare(pipe, prompt, **kwargs) -> PreparedImage:
    """Encode the prompt and draw the initial noise the way the pipeline's __call__ does (check, then encode).

    Keyword arguments (check's): negative_prompt, steps, guidance_scale, height, width, num_images, generator /
    seed, scheduler, latents, eta, guidance_rescale, true_cfg_scale, max_sequence_length, clip_skip, lora_scale,
    conditioning. guidance_scale: classifier-free guidance for sd / sdxl / sd3 (on when > 1) and z-image (on when
    > 0, pos + scale (pos - neg) as ZImagePipeline computes it), the guidance *embedding* for flux and flux2
    (guidance-distilled checkpoints); flux's classifier-free guidance is true_cfg_scale > 1 with a negative_prompt,
    as in FluxPipeline; for qwen-image and qwen-image-edit guidance_scale is the pipelines' true_cfg_scale (on when
    > 1 with a negative_prompt). guidance_rescale: sd / sdxl only. max_sequence_length: the T5 and LLM-encoder
    families (sd3, flux, flux2, qwen-image, qwen-image-edit, z-image). clip_skip: sd / sdxl / sd3. eta: DDIM only. lora_scale: the scale of the pipeline's loaded LoRA
    weights for this request (diffusers' cross_attention_kwargs / joint_attention_kwargs {"scale": s}).
    conditioning: an image task's inputs (driffusion_rt.pipelines.conditioning: img2img, inpainting,
    ControlNet), validated when it was made; it starts the run from the image (strength) or adds its inputs.
    generator (one torch.Generator, or a list with one per image for deterministic schedulers) or seed
    (a CPU generator seeded with it) as in `pipe(..., generator=torch.Generator().manual_seed(seed))`."""
    return encode(pipe, check(pipe, prompt, **kwargs))


def check_split(pipe, request: PreparedImage, layout):
    """Whether `layout`'s sequence groups (layout.Layout; None: none) can split a prepared request's calls: the
    family's rule (family.check_sequence) on the pipeline's configs. Raises ValueError naming the rule."""
    if layout is None or layout.seq == 1:
        return
    resolved = {"height": request.height, "width": request.width, "num_frames": getattr(request, "num_frames", None),
                **request.options, **getattr(request, "inputs", {})}
    check_sequence(get_family(pipe), component_configs(pipe), resolved, layout.ulysses, layout.ring)


@torch.no_grad()
def run(pipe, request: Prepared, *, mode="aggressive", parallel=None, sampler=None, progress=False, ulysses=1,
        ring=1, **sample_kwargs):
    """Sample a prepared request through the runtime; returns the SampleOutput (final latents in `.sample`).

    sampler: a persistent `driffusion_rt.Sampler` built on `model_adapter(pipe)` (its buffers and CUDA graphs
    then live across requests); None builds one for this call (layout.parallelize, with sequence groups of
    ulysses x ring ranks under torchrun: see docs/layouts.md). sample_kwargs: further sampling options (drafts=,
    and the iterative modes' subintervals, preconditioning, window, tolerance). A request drawing per-step noise
    (DDPM, DDIM eta > 0) consumes its generator: prepare a new request to repeat it."""
    options = SamplingOptions(mode=mode, parallel=parallel, **sample_kwargs)
    sampler = sampler if sampler is not None else parallelize(model_adapter(pipe), ulysses=ulysses, ring=ring)
    check_split(pipe, request, sampler.layout)
    return sampler.apply(request, options, progress=progress)
