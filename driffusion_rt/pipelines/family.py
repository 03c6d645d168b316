"""The family contract and registry: what a model family must provide, and the tables callers read.

A family is one module (sd.py, flux.py, wan.py, ...) defining a `Family` subclass and calling `register` once. The
shared code (prepare.py, decode.py, conditioning.py, video.py) drives a request through the family's hooks:
encode (prompt -> model kwargs) -> prepare (initial noise drawn as the pipeline draws it, plus the latent-geometry
kwargs) -> timesteps_kwargs (set_timesteps options) -> the runtime with `adapter(pipe)` -> decode. What a request
is checked against before any weights load comes from `rules_from_configs` (the pipeline's JSON configs), and for a
sequence-parallel layout from `sequence_tokens` (see `check_sequence`). docs/adding_a_family.md is the contract in
prose, with Z-Image (z_image.py) as the worked example.
"""
import math
from abc import ABC, abstractmethod

from .. import schedulers as named

# prepare's family-specific options and their defaults: a family lists the ones it takes in Family.options, the
# others must stay at their default
OPTIONS = {"clip_skip": None, "guidance_rescale": 0.0, "true_cfg_scale": 1.0, "max_sequence_length": None,
           "lora_scale": None}


class Family(ABC):
    """One model family: everything about its pipelines that the shared code does not know.

    Attributes: name ("sd"); pipeline_classes (diffusers class names it serves, subclasses count; a dict maps each
    to its task: one of tasks.TASKS); schedulers (the short names of driffusion_rt.schedulers that fit it) and
    default_scheduler (replaces a shipped scheduler the runtime cannot run, with a warning); default_steps and
    default_guidance (the pipelines' own defaults); guidance_argument (the pipelines' __call__ argument a request's
    guidance_scale stands for: Qwen-Image's true_cfg_scale); options (the OPTIONS keys it takes). A family that
    takes images (conditioning.py) also defines encode_image(pipe, image, generator, task=...), strength_rule,
    img2img_size_from_image and lora_kwargs (Flux also pack(pipe, latents)); an editing family edit_size,
    prompt_image, edit_pixels and condition (qwen_image_edit.py). Video families subclass video.VideoFamily."""
    name: str
    pipeline_classes: tuple
    schedulers: tuple
    default_scheduler: str
    default_steps: int
    default_guidance: float
    guidance_argument = "guidance_scale"
    options: tuple = ()
    video = False
    sequence_parallel = False  # its denoiser carries diffusers' context-parallel plan: see sequence_tokens

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

    def rules_from_configs(self, configs: dict) -> tuple | None:
        """(multiple, why, (height, width) default, image factor) from the pipeline's configs (model_index.json
        and the vae / unet / transformer configs, as `configs[name]`), equal to what size_multiple and
        default_size give once loaded; the image factor is the pipeline's image processor's (sizes taken from an
        input image round down to it). None when only the loaded pipeline can tell (checked then)."""
        return None

    def sequence_tokens(self, configs: dict, resolved: dict) -> dict:
        """For a family with `sequence_parallel`: the token counts of a request that diffusers' context parallelism
        splits across a sequence group, by a name that says how they are counted, from the pipeline's configs (as
        `configs[name]`: model_ref's before loading, `component_configs` once loaded) and the request's resolved
        values (height, width, num_frames, max_sequence_length); a count whose values are not resolved yet is left
        out (it is checked again once they are). Saying `sequence_parallel = True` and this rule is all a family
        needs: the layout turns diffusers' context parallelism on for the adapter's denoisers (sequence.py)."""
        return {}

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


def vae_scale_of(configs: dict) -> int:
    """The VAE scale factor diffusers' pipelines derive from the VAE config: 2 ** (len(block_out_channels) - 1)."""
    vae = configs.get("vae") or {}
    return 2 ** (len(vae["block_out_channels"]) - 1) if vae.get("block_out_channels") else 8


def denoiser_config(configs: dict) -> dict:
    return configs.get("unet") or configs.get("transformer") or {}


def component_configs(pipe) -> dict:
    """The configs of a loaded pipeline's VAE and denoiser, as model_ref reads them from its files."""
    return {name: dict(getattr(pipe, name).config) for name in ("vae", "unet", "transformer")
            if getattr(getattr(pipe, name, None), "config", None) is not None}


def check_sequence(family: "Family", configs: dict, resolved: dict | None, ulysses: int, ring: int):
    """Whether a sequence group of ulysses x ring ranks can split this family's calls for a request (resolved
    values; None: the model alone): the family has sequence parallelism, Ulysses' degree divides the transformer's
    attention heads (each rank attends with 1/ulysses of them), and every token count the split cuts is divisible
    by ulysses x ring (each rank takes an equal share). Raises ValueError naming the rule."""
    degree = ulysses * ring
    if degree == 1:
        return
    if not family.sequence_parallel:
        able = ", ".join(f.name for f in REGISTRY.values() if f.sequence_parallel)
        raise ValueError(f"--ulysses {ulysses} / --ring {ring} split a transformer's tokens with diffusers' context "
                         f"parallelism, which the {family.name} family's denoiser does not have (no context-parallel "
                         f"plan); families with it: {able}")
    heads = denoiser_config(configs).get("num_attention_heads")
    if heads and heads % ulysses:
        raise ValueError(f"--ulysses {ulysses} gives each rank of a sequence group 1/{ulysses} of the transformer's "
                         f"attention heads, but it has {heads}: use a --ulysses that divides {heads} (or --ring)")
    for name, n in family.sequence_tokens(configs, resolved or {}).items():
        if n % degree:
            raise ValueError(f"this request has {n} {name}, not divisible by the sequence degree ulysses x ring = "
                             f"{degree}: each rank of a sequence group takes an equal share; choose a size (or "
                             f"frame count) whose token count it divides")


def square(sample, scale: int) -> tuple:
    """(height, width) in pixels of a denoiser sample size (an int or [h, w]) times the VAE scale."""
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample[:2])
    return int(h) * scale, int(w) * scale


def lcm8(vae_scale: int) -> tuple:
    """The SD / SDXL size rule: multiples of 8 and of the VAE scale factor."""
    return math.lcm(8, vae_scale), f"multiples of 8 and of the VAE scale factor {vae_scale}"


def packed(vae_scale: int, why: str) -> tuple:
    """The size rule of transformers on 2 x 2 packed latents (Flux.1, Flux.2, Qwen-Image, Z-Image): multiples of
    twice the VAE scale factor, for the reason `why`."""
    return vae_scale * 2, f"VAE scale factor {vae_scale} x 2 for {why}"


REGISTRY: dict = {}  # family name -> Family, in registration order
# views of the registry, filled by register(): the tables callers (requests, tests) read
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


def family_names(video: bool) -> str:
    """The registered families that make videos (video=True) or images, by name, for messages."""
    return ", ".join(f.name for f in REGISTRY.values() if f.video == video)


def pipeline_classes(family: Family) -> dict:
    """The family's pipeline class names, each with its task."""
    c = family.pipeline_classes
    return dict(c) if isinstance(c, dict) else {name: "text2img" for name in c}


def _supported_families() -> str:
    return ", ".join(f"{fam} ({cls})" for cls, fam in FAMILIES.items())


def family_of_class(class_name, where: str = "the pipeline") -> str:
    fam = FAMILIES.get(class_name)
    if fam is None:
        raise ValueError(f"unsupported pipeline family: {where} is a {class_name!r}; supported: "
                         f"{_supported_families()}")
    return fam


def family_of(pipe) -> str:
    """The family ("sd", "sdxl", "sd3", "flux", ...) of a loaded pipeline (subclasses of a supported class count)."""
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
