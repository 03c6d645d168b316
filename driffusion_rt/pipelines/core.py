"""The family-independent part of `driffusion_rt.pipelines`: loading, the family registry, scheduler choice,
request preparation, run, decode dispatch, text_to_image and DRiffusionPipeline.

What differs between model families (adapter, prompt encoding, latent preparation, size rules, defaults, decode)
lives in one module per family, each an instance of `Family` passed to `register`."""
import dataclasses
import inspect
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .. import schedulers as named
from ..sampler import Sampler, SampleStats, sample
from ..trajectory import Trajectory, UnsupportedScheduler

OUTPUT_TYPES = ("latent", "pt", "np", "pil")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# prepare's family-specific options and their defaults: a family lists the ones it takes in Family.options, the
# others must stay at their default
OPTIONS = {"clip_skip": None, "guidance_rescale": 0.0, "true_cfg_scale": 1.0, "max_sequence_length": None,
           "lora_scale": None}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


# ---------------------------------------------------------------------------------------------- families


class Family(ABC):
    """One model family: everything about its pipelines that the shared code does not know.

    Attributes: name ("sd"); pipeline_classes (diffusers class names it serves, subclasses count); schedulers (the
    short names of driffusion_rt.schedulers that fit it) and default_scheduler (replaces a shipped scheduler the
    runtime cannot run, with a warning);
    default_steps and default_guidance (the pipelines' own defaults); options (the OPTIONS keys it takes).

    A request is encode (prompt -> model_kwargs) -> prepare (initial noise drawn as the pipeline draws it, plus the
    latent-geometry kwargs) -> timesteps_kwargs (set_timesteps options) -> the runtime with `adapter(pipe)` ->
    decode. Room for what comes next without new hooks: video families return 5-D latents from prepare, frames
    from decode and a `.frames` output_class (num_frames joins height / width as a size argument then); Wan 2.2's
    two transformers are one adapter that picks per row by timestep (rows of one call can straddle the boundary);
    ControlNet residuals and LoRA scales are per-request model_kwargs the adapter turns into its denoiser's
    arguments; img2img is a prepare that encodes the image and a trajectory that starts at the strength's step.

    Image tasks (conditioning.py): pipeline_classes may map each class name to its task ("text2img", "img2img",
    "inpaint", "controlnet"); a family that takes images defines encode_image(pipe, image, generator, task=...)
    and strength_rule / img2img_size_from_image (Flux also pack(pipe, latents))."""
    name: str
    pipeline_classes: tuple
    schedulers: tuple
    default_scheduler: str
    default_steps: int
    default_guidance: float
    options: tuple = ()

    @abstractmethod
    def output_class(self) -> type:
        """The pipelines' own output class (a diffusers BaseOutput dataclass)."""

    @abstractmethod
    def adapter(self, pipe):
        """The runtime model `model(x_in, t, **model_kwargs)` for the pipeline's denoiser (stateless)."""

    @abstractmethod
    def size_multiple(self, pipe) -> tuple:
        """(m, why): height and width must be multiples of m, the pipeline's own rule, for the reason `why`."""

    def default_size(self, pipe) -> tuple:
        """(height, width) the pipeline uses when none is given."""
        s = pipe.default_sample_size * int(pipe.vae_scale_factor)
        return s, s

    @abstractmethod
    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               **options) -> dict:
        """The per-request model_kwargs (prompt embeddings, guidance, added conditions): tensors with first dim
        == batch are repeated for the drafts, `Shared` ones are not. options: the family's OPTIONS."""

    @abstractmethod
    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device) -> tuple:
        """(x, extra_kwargs): the initial unit noise drawn exactly as the pipeline's prepare_latents draws it (or
        the given `latents`, shape-checked), and model_kwargs that depend on the latent geometry."""

    def timesteps_kwargs(self, pipe, scheduler, latents, steps) -> dict | None:
        """Options of scheduler.set_timesteps the pipeline passes (e.g. the dynamic-shifting mu)."""
        return None

    @abstractmethod
    def decode(self, pipe, latents, *, height, width, output_type, generator) -> tuple:
        """The output_class fields, in order, for final latents and an output_type other than "latent"."""


REGISTRY: dict = {}  # family name -> Family, in registration order
# views of the registry, filled by register(): the tables callers (services, tests) read
FAMILIES = {}  # pipeline class name -> family name
SCHEDULERS = {}  # family name -> names a --scheduler flag accepts
DEFAULT_SCHEDULER = {}
DEFAULT_GUIDANCE = {}  # the pipelines' own defaults
DEFAULT_STEPS = {}


def register(family: Family) -> Family:
    """Add a family (each family module calls this once when the package imports it)."""
    if family.name in REGISTRY:
        raise ValueError(f"family {family.name!r} is registered twice")
    unknown = [s for s in family.schedulers if s not in named.NAMES]
    bad = [o for o in family.options if o not in OPTIONS]
    if unknown or bad or family.default_scheduler not in family.schedulers:
        raise ValueError(f"family {family.name!r}: schedulers {unknown} / options {bad} are not known, or its "
                         f"default scheduler {family.default_scheduler!r} is not one of its schedulers")
    REGISTRY[family.name] = family
    FAMILIES.update({cls: family.name for cls in family.pipeline_classes})
    SCHEDULERS[family.name] = tuple(family.schedulers)
    DEFAULT_SCHEDULER[family.name] = family.default_scheduler
    DEFAULT_GUIDANCE[family.name] = family.default_guidance
    DEFAULT_STEPS[family.name] = family.default_steps
    return family


def _supported_families() -> str:
    return ", ".join(f"{fam} ({cls})" for cls, fam in FAMILIES.items())


def family_of_class(class_name, where: str = "the pipeline") -> str:
    fam = FAMILIES.get(class_name)
    if fam is None:
        raise ValueError(f"unsupported pipeline family: {where} is a {class_name!r}; supported: "
                         f"{_supported_families()}")
    return fam


def family_of(pipe) -> str:
    """The family ("sd", "sdxl", "sd3", "flux") of a loaded pipeline (subclasses of a supported class count)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return family_of_class(type(pipe).__name__)


def get_family(pipe) -> Family:
    """The registered Family of a loaded pipeline."""
    return REGISTRY[family_of(pipe)]


def model_adapter(pipe):
    """The runtime model for a pipeline's denoiser (stateless: every per-request input is a model kwarg)."""
    return get_family(pipe).adapter(pipe)


def output_class(pipe):
    """The pipeline's own output class (StableDiffusionPipelineOutput, ..., FluxPipelineOutput)."""
    return get_family(pipe).output_class()


def size_multiple(pipe) -> tuple:
    """(m, why): height and width must be multiples of m, the pipeline's own rule, for the reason `why`."""
    return get_family(pipe).size_multiple(pipe)


def default_size(pipe) -> tuple:
    return get_family(pipe).default_size(pipe)


# ---------------------------------------------------------------------------------------------- loading


def _dtype_keyword() -> str:
    """Recent diffusers name from_pretrained's dtype argument `dtype` and deprecate `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
        return "dtype"
    except ImportError:
        return "torch_dtype"


def parse_dtype(dtype) -> torch.dtype:
    """torch.dtype or one of DTYPES' names ("float32", "fp16", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPES)}; got {dtype!r}")


def check_model_dir(path: str) -> dict:
    """Validate a local pipeline directory before loading it; returns its model_index.json.

    Raises FileNotFoundError (no model_index.json, a component folder missing) or ValueError (an unreadable
    model_index.json, a pipeline class outside the supported families)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"model directory {path!r} is incomplete: it has no model_index.json "
                                f"(expected a diffusers pipeline saved with save_pretrained)")
    try:
        with open(index, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{index} is not a readable JSON model index: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{index} is not a diffusers model index (a JSON object with _class_name)")
    family_of_class(config.get("_class_name"), where=index)
    missing = [name for name, spec in config.items()
               if not name.startswith("_") and isinstance(spec, (list, tuple)) and len(spec) == 2
               and spec[0] is not None and spec[1] is not None
               and not (os.path.isdir(os.path.join(path, name)) and os.listdir(os.path.join(path, name)))]
    if missing:
        raise FileNotFoundError(f"model directory {path!r} is incomplete: component folder(s) {', '.join(missing)} "
                                f"listed in model_index.json are missing or empty")
    return config


def load_pipeline(model: str, dtype=torch.float32, device="cpu"):
    """Load a pipeline of a supported family from a local directory (offline) or a hub id, on `device`.

    model: a directory holding a diffusers pipeline (model_index.json + component folders) or a hub id
    ("org/name"). Errors: FileNotFoundError for a missing path that is not a plausible hub id, an incomplete
    directory, or a hub id that cannot be fetched; ValueError for an unsupported pipeline class or dtype."""
    from diffusers import DiffusionPipeline

    dtype = parse_dtype(dtype)
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model must be a pipeline directory or a hub id, got {model!r}")
    model = os.fspath(model)
    local = os.path.isdir(model)
    if local:
        check_model_dir(model)
    elif os.path.exists(model):
        raise FileNotFoundError(f"model {model!r} is a file, not a pipeline directory (expected a folder with "
                                f"model_index.json, or a hub id such as 'org/name')")
    elif not _HUB_ID.match(model) or model.startswith((".", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"model directory {model!r} does not exist (and it is not a hub id of the form "
                                f"'org/name')")
    else:
        try:
            config = DiffusionPipeline.load_config(model)
        except Exception as e:  # offline without a cache, unknown repo, no network...
            raise FileNotFoundError(f"model {model!r} is not a local directory and could not be fetched as a hub "
                                    f"id: {type(e).__name__}: {e}") from e
        family_of_class(config.get("_class_name"), where=f"hub model {model!r}")
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **{_dtype_keyword(): dtype}, local_files_only=local)
    except (OSError, EnvironmentError) as e:
        raise FileNotFoundError(f"could not load the pipeline in {model!r}: {e}") from e
    family_of(pipe)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------- schedulers


def make_scheduler(pipe, name: str | None = None):
    """The scheduler for a request: `name` is one of SCHEDULERS[family] (a short name of driffusion_rt.schedulers,
    built from the pipeline's scheduler config, so it keeps the checkpoint's schedule) or None: the pipeline's own
    scheduler, as shipped (with clip_sample / thresholding switched off, and a warning, if they were on: the
    runtime cannot run them). Whether the runtime can run it is decided when its trajectory is probed (prepare)."""
    own, fam = pipe.scheduler, family_of(pipe)
    if name is not None:
        if name not in SCHEDULERS[fam]:
            raise ValueError(f"scheduler {name!r} is not supported for the {fam} family; supported: "
                             f"{', '.join(SCHEDULERS[fam])}")
        return named.build(name, own.config)
    on = [k for k in named.NONLINEAR_OFF if own.config.get(k, False)]
    if not on:
        return own
    warnings.warn(f"{type(own).__name__} has {', '.join(f'{k}=True' for k in on)}, which the runtime cannot run "
                  f"(nonlinear steps); sampling with {' and '.join(f'{k}=False' for k in on)}", stacklevel=3)
    return type(own).from_config(own.config, **{k: False for k in on})


def _trajectory(pipe, family, sched, named_scheduler, steps, timesteps_kwargs, step_kwargs, start=0):
    """The probed trajectory (from index `start`: img2img); a shipped scheduler the runtime cannot run is replaced
    by the family default, announced with a warning (a named one is an error)."""
    try:
        return sched, Trajectory.from_scheduler(sched, steps, timesteps_kwargs, start, **step_kwargs)
    except UnsupportedScheduler as e:
        if named_scheduler is not None:
            raise
        warnings.warn(f"the pipeline's {type(sched).__name__} cannot run through the runtime ({e}); using "
                      f"{family.default_scheduler!r} instead", stacklevel=3)
        sched = named.build(family.default_scheduler, sched.config)
        return sched, Trajectory.from_scheduler(sched, steps, timesteps_kwargs, start)


# ---------------------------------------------------------------------------------------------- guidance


def scaled(scale, x: torch.Tensor) -> torch.Tensor:
    """scale * x for a float or a 0-d tensor scale (what CUDA graphs pass, cuda_graphs.py), with the same rounding:
    a Python float is applied in float32 to half / bfloat16 data, so is the tensor (no host sync either way)."""
    if not isinstance(scale, torch.Tensor):
        return scale * x
    op = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (scale.to(op) * x.to(op)).to(x.dtype)


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """uncond + scale * (cond - uncond), as the diffusers pipelines compute it; scale a float or a 0-d tensor."""
    return uncond + scaled(scale, cond - uncond)


def guide(out: torch.Tensor, scale) -> tuple:
    """Classifier-free guidance of one batched [uncond; cond] output: (guided, cond)."""
    uncond, cond = out.chunk(2)
    return cfg(uncond, cond, scale), cond


def rescale(out: torch.Tensor, cond: torch.Tensor, factor) -> torch.Tensor:
    """diffusers' rescale_noise_cfg (guidance_rescale, Lin et al. 2023 section 3.4) for a float or 0-d tensor factor."""
    if not isinstance(factor, torch.Tensor):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
        return rescale_noise_cfg(out, cond, guidance_rescale=factor)
    dims = list(range(1, cond.ndim))
    rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return scaled(factor, rescaled) + scaled(1 - factor, out)


# ---------------------------------------------------------------------------------------------- requests


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


@dataclass
class Request:
    """Everything one text-to-image request needs, prepared once (every rank prepares the same request)."""
    family: str
    height: int
    width: int
    steps: int
    latents: torch.Tensor          # unit noise [B, ...] (Flux: packed [B, tokens, C])
    model_kwargs: dict
    trajectory: Trajectory         # the scheduler run (set_timesteps options and step options included)
    generator: torch.Generator | None  # continues after the initial draw: the stochastic steps' noise
    decode_generator: object = None
    step_kwargs: dict = field(default_factory=dict)
    # inpainting's per-step mask blend (driffusion_rt.blend.MaskBlend) or None; keyword-only, so subclasses'
    # positional fields keep their places
    blend: object = field(default=None, kw_only=True)


def _batch(prompt) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")


def draw_noise(shape, generator, device, dtype, latents):
    """Unit noise as the pipelines' prepare_latents draws it (randn_tensor), or the given latents, shape-checked."""
    from diffusers.utils.torch_utils import randn_tensor

    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype)
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"a list of {len(generator)} generators for a batch of {shape[0]} images")
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _check_options(family: Family, options: dict):
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


@torch.no_grad()
def prepare(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
            num_images=1, generator=None, seed=None, scheduler=None, latents=None, eta=0.0, guidance_rescale=0.0,
            true_cfg_scale=1.0, max_sequence_length=None, clip_skip=None, lora_scale=None,
            conditioning=None) -> Request:
    """Encode the prompt and draw the initial noise the way the pipeline's __call__ does.

    guidance_scale: classifier-free guidance for sd / sdxl / sd3 (on when > 1), the guidance *embedding* for
    flux (guidance-distilled checkpoints); flux's classifier-free guidance is true_cfg_scale > 1 with a
    negative_prompt, as in FluxPipeline. guidance_rescale: sd / sdxl only. max_sequence_length: the T5 families
    (sd3, flux). clip_skip: not flux. eta: DDIM only. lora_scale: the scale of the pipeline's loaded LoRA
    weights for this request (diffusers' cross_attention_kwargs / joint_attention_kwargs {"scale": s}).
    conditioning: an image task's inputs (driffusion_rt.pipelines.conditioning: img2img, inpainting,
    ControlNet), validated when it was made; it starts the run from the image (strength) or adds its inputs.
    generator (one torch.Generator, or a list with one per image for deterministic schedulers) or seed
    (a CPU generator seeded with it) as in `pipe(..., generator=torch.Generator().manual_seed(seed))`."""
    family = get_family(pipe)
    if getattr(family, "video", False):
        raise ValueError(f"the {family.name} pipeline ({type(pipe).__name__}) makes videos: use text_to_video / "
                         f"prepare_video (driffusion_rt.pipelines.video)")
    generator, steps = common_args(family, generator, seed, steps, num_images=num_images)
    guidance_scale = family.default_guidance if guidance_scale is None else float(guidance_scale)
    options = dict(clip_skip=clip_skip, guidance_rescale=guidance_rescale, true_cfg_scale=true_cfg_scale,
                   max_sequence_length=max_sequence_length, lora_scale=lora_scale)
    _check_options(family, options)
    batch = _batch(prompt) * num_images
    if conditioning is not None:  # the image's size is the default, and what only the task can check
        height, width = conditioning.begin(pipe, family, height=height, width=width, steps=steps, batch=batch,
                                           num_images=num_images, latents=latents)
    height, width = check_size(pipe, height, width)
    sched = make_scheduler(pipe, scheduler)
    step_kwargs = {"eta": float(eta)} if "eta" in inspect.signature(sched.step).parameters else {}
    if eta and not step_kwargs:
        raise ValueError(f"eta is an option of DDIM-type schedulers; the scheduler is {type(sched).__name__}")
    prompt = list(prompt) if isinstance(prompt, tuple) else prompt  # the pipelines test isinstance(prompt, list)
    if isinstance(negative_prompt, tuple):
        negative_prompt = list(negative_prompt)
    if isinstance(prompt, (list, tuple)) and isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)  # the pipelines want matching types
    device = pipe._execution_device

    kw = family.encode(pipe, prompt, negative_prompt, batch=batch, num_images=num_images,
                       guidance_scale=guidance_scale, height=height, width=width, device=device,
                       **{name: options[name] for name in family.options})
    blend = None
    if conditioning is not None:
        x, sched, traj, blend = conditioning.prepare(pipe, family, kw, sched=sched, named_scheduler=scheduler,
                                                     steps=steps, step_kwargs=step_kwargs, batch=batch, height=height,
                                                     width=width, generator=generator, latents=latents, device=device)
    else:
        x, geometry = family.prepare(pipe, kw, batch=batch, height=height, width=width, generator=generator,
                                     latents=latents, device=device)
        kw.update(geometry)
        sched, traj = _trajectory(pipe, family, sched, scheduler, steps,
                                  family.timesteps_kwargs(pipe, sched, x, steps), step_kwargs)
    return Request(family.name, height, width, steps, x, kw, traj, run_generator(generator, traj), generator,
                   step_kwargs, blend=blend)


def run_generator(generator, traj):
    """The generator the sampler draws step noise from: a list of per-image generators only seeds the latents,
    so it is refused when the scheduler draws noise at steps. Raises ValueError."""
    if not isinstance(generator, list):
        return generator
    if any(traj.noisy):
        raise ValueError(f"a list of generators works only with deterministic schedulers; "
                         f"{traj.scheduler_name} draws noise at every step: pass one torch.Generator")
    return None


@torch.no_grad()
def run(pipe, request: Request, *, mode="aggressive", parallel=None, sampler=None, progress=False, **sample_kwargs):
    """Sample a prepared request through the runtime; returns the SampleOutput (final latents in `.sample`).

    sampler: a persistent `driffusion_rt.Sampler` built on `model_adapter(pipe)` (its buffers and CUDA graphs
    then live across requests); None runs `driffusion_rt.sample` (a fresh one). sample_kwargs: further options
    of `sample` (e.g. drafts=). A request drawing per-step noise (DDPM, DDIM eta > 0) consumes its generator:
    prepare a new request to repeat it."""
    opts = dict(steps=request.steps, start=request.trajectory.start, mode=mode, parallel=parallel,
                generator=request.generator, model_kwargs=request.model_kwargs, progress=progress, **sample_kwargs)
    if request.blend is not None:
        opts["blend"] = request.blend
    if sampler is not None:
        return sampler(request.trajectory, request.latents, **opts)
    return sample(model_adapter(pipe), request.trajectory, request.latents, **opts)


# ---------------------------------------------------------------------------------------------- decoding


def _check_output_type(output_type):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def _empty_fields(cls) -> tuple:
    return (None,) * len(dataclasses.fields(cls))


def _output(cls, fields: tuple):
    return cls(**{f.name: v for f, v in zip(dataclasses.fields(cls), fields)})


@torch.no_grad()
def decode(pipe, latents, *, height, width, output_type="pil", generator=None, return_dict=True):
    """VAE-decode final latents as the pipeline's __call__ does after its loop and return what it returns:
    its output class (`.images`; SD also `.nsfw_content_detected`), or a tuple with return_dict=False.

    output_type: "latent" (the latents as they are, Flux's packed), "pt", "np" or "pil". Call it on one rank."""
    _check_output_type(output_type)
    family = get_family(pipe)
    cls = family.output_class()
    if output_type == "latent":
        fields = (latents,) + _empty_fields(cls)[1:]
    else:
        fields = family.decode(pipe, latents, height=height, width=width, output_type=output_type,
                               generator=generator)
    pipe.maybe_free_model_hooks()
    return _output(cls, fields) if return_dict else fields


def _is_rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def text_to_image(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
                  num_images=1, seed=None, generator=None, scheduler=None, mode="aggressive", parallel=None,
                  output_type="pil", eta=0.0, guidance_rescale=0.0, true_cfg_scale=1.0, max_sequence_length=None,
                  clip_skip=None, latents=None, progress=False, sampler=None, lora_scale=None, conditioning=None,
                  **sample_kwargs) -> tuple:
    """Generate images from a prompt through the draft-and-refine runtime. Returns (images, stats).

    images: as the pipeline returns them for output_type ("pil": list of PIL images, "np": [N, H, W, 3] floats,
    "pt": [N, 3, H, W], "latent": the final latents). stats: the run's SampleStats. Under torchrun every rank
    calls this; only rank 0 decodes, the other ranks get images=None. mode="sequential" equals
    `pipe(prompt, ..., generator=torch.Generator().manual_seed(seed))` with the same scheduler. See `prepare`
    for the per-family meaning of guidance_scale / true_cfg_scale and for lora_scale / conditioning (the image
    tasks' functions in driffusion_rt.pipelines.conditioning call this with it), `run` for sampler /
    sample_kwargs; progress shows a bar of rounds on rank 0."""
    _check_output_type(output_type)
    req = prepare(pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                  height=height, width=width, num_images=num_images, generator=generator, seed=seed,
                  scheduler=scheduler, latents=latents, eta=eta, guidance_rescale=guidance_rescale,
                  true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length, clip_skip=clip_skip,
                  lora_scale=lora_scale, conditioning=conditioning)
    out = run(pipe, req, mode=mode, parallel=parallel, sampler=sampler, progress=progress, **sample_kwargs)
    images = None
    if _is_rank0():
        images = decode(pipe, out.sample, height=req.height, width=req.width, output_type=output_type,
                        generator=req.decode_generator).images
    return images, out.stats


class DRiffusionPipeline:
    """Wrap an already loaded diffusers pipeline so that calling it samples through the runtime.

        pipe = DRiffusionPipeline(StableDiffusionXLPipeline.from_pretrained(...).to("cuda"), mode="aggressive")
        image = pipe("a photo of a cat", num_inference_steps=30).images[0]
        pipe.last_stats  # SampleStats of the last call: serial_rounds, model_evals, wall_time, ideal_speedup, ...

    __call__ takes the wrapped pipeline's common arguments and returns what it returns (its own output class, or
    a tuple with return_dict=False). Arguments the runtime cannot honour (callbacks, custom timesteps, ...) are
    not accepted (TypeError). One persistent `Sampler` serves every call (buffers, CUDA graphs). Under torchrun
    every rank calls it; only rank 0 decodes (the other ranks get images=None). sample_kwargs: further options
    of `driffusion_rt.sample` (e.g. drafts=). Other attributes are forwarded to the wrapped pipeline.

    Image pipelines take their own image arguments too: Img2Img pipelines `image` and `strength`, inpainting
    pipelines `image`, `mask_image` and `strength`, ControlNet pipelines `image` (the control image(s)),
    controlnet_conditioning_scale, guess_mode, control_guidance_start / end; the per-call LoRA scale is
    `cross_attention_kwargs={"scale": s}` (SD, SDXL) or `joint_attention_kwargs={"scale": s}` (SD3, Flux).
    cfg_parallel=2 (under torchrun, an even number of ranks): the uncond and cond halves of every guided call run
    on two ranks; parallel then defaults to the draft ranks (world / 2)."""

    def __new__(cls, pipe, *args, **kwargs):
        """A video pipeline gets the video wrapper (video.DRiffusionVideoPipeline: num_frames, `.frames`)."""
        if cls is DRiffusionPipeline and getattr(get_family(pipe), "video", False):
            from .video import DRiffusionVideoPipeline
            cls = DRiffusionVideoPipeline
        return super().__new__(cls)

    def __init__(self, pipe, mode="aggressive", parallel=None, scheduler=None, progress=False, cfg_parallel=1,
                 **sample_kwargs):
        from ..cfg_parallel import parse
        family_of(pipe)
        self.pipe, self.mode, self.parallel, self.scheduler = pipe, mode, parallel, scheduler
        self.progress, self.sample_kwargs, self.cfg_parallel = progress, sample_kwargs, int(parse(cfg_parallel))
        self.last_stats: SampleStats | None = None
        self.model = model_adapter(pipe)
        self._sampler = None

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def sampler(self):
        """Built on first use, so a process group initialised after wrapping is picked up. With cfg_parallel=2 the
        job's ranks form a (draft, cfg) layout and each guided denoiser call is split across a pair
        (driffusion_rt.cfg_parallel); every rank must wrap the pipeline the same way."""
        if self._sampler is None:
            from ..cfg_parallel import Layout, denoisers
            from ..distributed import current, default_evaluator
            layout = Layout.make(self.cfg_parallel, current())
            layout.apply(*denoisers(self.model, self.pipe))
            self._sampler = Sampler(self.model, default_evaluator(self.model, layout),
                                    cuda_graphs=layout.cfg == 1)
        return self._sampler

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=None, guidance_scale=None, height=None,
                 width=None, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True, eta=0.0,
                 guidance_rescale=0.0, true_cfg_scale=1.0, max_sequence_length=None, clip_skip=None, latents=None,
                 image=None, strength=None, mask_image=None, controlnet_conditioning_scale=1.0, guess_mode=False,
                 control_guidance_start=0.0, control_guidance_end=1.0, cross_attention_kwargs=None,
                 joint_attention_kwargs=None):
        from . import conditioning as cond
        if prompt is None:
            raise ValueError("prompt is required (precomputed prompt embeddings are not supported)")
        _check_output_type(output_type)
        inputs = cond.from_call(self.pipe, image=image, strength=strength, mask_image=mask_image,
                                controlnet_conditioning_scale=controlnet_conditioning_scale, guess_mode=guess_mode,
                                control_guidance_start=control_guidance_start,
                                control_guidance_end=control_guidance_end)
        lora_scale = cond.lora_scale_of(self.pipe, cross_attention_kwargs, joint_attention_kwargs)
        req = prepare(self.pipe, prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=height, width=width, num_images=num_images_per_prompt,
                      generator=generator, scheduler=self.scheduler, latents=latents, eta=eta,
                      guidance_rescale=guidance_rescale, true_cfg_scale=true_cfg_scale,
                      max_sequence_length=max_sequence_length, clip_skip=clip_skip, lora_scale=lora_scale,
                      conditioning=inputs)
        out = run(self.pipe, req, mode=self.mode, parallel=self.parallel, sampler=self.sampler,
                  progress=self.progress, **self.sample_kwargs)
        self.last_stats = out.stats
        if not _is_rank0():
            cls = output_class(self.pipe)
            return _output(cls, _empty_fields(cls)) if return_dict else _empty_fields(cls)
        return decode(self.pipe, out.sample, height=req.height, width=req.width, output_type=output_type,
                      generator=req.decode_generator, return_dict=return_dict)
