"""Text-to-image through the runtime: diffusers pipelines of the SD 1.5 / 2.1, SDXL, SD3 and Flux families.

A request goes: encode the prompt once (the pipeline's own encode_prompt) -> draw the initial noise exactly as the
pipeline's prepare_latents draws it (same generator calls, shape and dtype, but as unit noise: `sample()` applies
init_noise_sigma) -> `driffusion_rt.sample` with a model adapter -> VAE decode (rank 0 only under torchrun).

The adapters turn a pipeline's denoiser into the runtime's model call `model(x_in, t, **model_kwargs)`:
x_in is [rows, ...] with rows = drafts x batch (already through scale_model_input), t one timestep per row.
Classifier-free guidance happens inside the call (uncond and cond batched as one denoiser call, like the
pipelines do); per-request tensors sit in model_kwargs with first dim == the latent batch B so the runtime
repeats them for the drafts of a call, the negative and positive embeddings as separate entries so the
repetition keeps them aligned. Tensors that are per-shape constants (Flux's img_ids / txt_ids, whose first
dim is a token count that may equal B by chance) are wrapped in `Shared`, which the runtime never repeats.

With mode="sequential" the result equals the plain pipeline call with the same seed and scheduler (tests:
max relative error <= 1e-5 in float32). Not supported (raise or are simply not offered): callbacks
(callback_on_step_end), custom `timesteps` / `sigmas`, IP adapters, cross/joint attention kwargs (LoRA scale),
SDXL's denoising_end, SD3's skip-layer guidance, precomputed prompt embeddings, and schedulers the runtime cannot
express as affine steps (multistep solvers such as PNDM or DPM-Solver: a pipeline that ships one gets the family's
default scheduler instead, see `make_scheduler`).
"""
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..evaluator import Shared
from ..sampler import Sampler, SampleStats, sample
from ..trajectory import Trajectory

FAMILIES = {  # pipeline class name -> family
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
SCHEDULERS = {  # names a --scheduler flag accepts, per family
    "sd": ("ddim", "ddpm", "euler"),
    "sdxl": ("ddim", "ddpm", "euler"),
    "sd3": ("flow",),
    "flux": ("flow",),
}
DEFAULT_SCHEDULER = {"sd": "ddim", "sdxl": "euler", "sd3": "flow", "flux": "flow"}
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                     "flow": "FlowMatchEulerDiscreteScheduler"}
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}  # the pipelines' own defaults
DEFAULT_STEPS = {"sd": 50, "sdxl": 50, "sd3": 28, "flux": 28}
OUTPUT_TYPES = ("latent", "pt", "np", "pil")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def _dtype_keyword() -> str:
    """Recent diffusers name from_pretrained's dtype argument `dtype` and deprecate `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
        return "dtype"
    except ImportError:
        return "torch_dtype"


def _supported_families() -> str:
    return ", ".join(f"{fam} ({cls})" for cls, fam in FAMILIES.items())


# ---------------------------------------------------------------------------------------------- loading


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
    """The scheduler for a request: `name` is one of SCHEDULERS[family] or None.

    A named scheduler is built with `XScheduler.from_config(pipe.scheduler.config)` (clip_sample and thresholding
    off), so it keeps the checkpoint's betas, prediction type and spacing. None keeps the pipeline's own scheduler
    when the runtime supports its class (rebuilt with clip_sample / thresholding off if they were on), and
    otherwise uses the family default (DEFAULT_SCHEDULER: e.g. SD 1.5 checkpoints ship PNDM, which is multistep)."""
    import diffusers

    fam = family_of(pipe)
    allowed = SCHEDULERS[fam]
    own = pipe.scheduler
    if name is None:
        own_name = {v: k for k, v in SCHEDULER_CLASSES.items()}.get(type(own).__name__)
        if own_name in allowed:
            cfg = own.config
            if not cfg.get("clip_sample", False) and not cfg.get("thresholding", False):
                return own
            name = own_name
        else:
            name = DEFAULT_SCHEDULER[fam]
    if name not in allowed:
        raise ValueError(f"scheduler {name!r} is not supported for the {fam} family; supported: {', '.join(allowed)}")
    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    extra = {}
    params = inspect.signature(cls.__init__).parameters
    for flag in ("clip_sample", "thresholding"):
        if flag in params:
            extra[flag] = False
    return cls.from_config(own.config, **extra)


# ---------------------------------------------------------------------------------------------- adapters


def _guide(out: torch.Tensor, scale: float) -> tuple:
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond), cond


class UNetAdapter:
    """UNet2DConditionModel (SD 1.5 / 2.1 / SDXL) as a runtime model, classifier-free guidance inside.

    model_kwargs: prompt_embeds [B, L, D]; negative_prompt_embeds (present iff guidance is on); guidance_scale,
    guidance_rescale (floats); SDXL: text_embeds / negative_text_embeds [B, P], time_ids / negative_time_ids
    [B, 6]; timestep_cond [B, C] for UNets with time_cond_proj_dim."""

    def __init__(self, unet):
        self.unet = unet

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, negative_prompt_embeds=None, guidance_scale=1.0, guidance_rescale=0.0,
                 text_embeds=None, negative_text_embeds=None, time_ids=None, negative_time_ids=None,
                 timestep_cond=None):
        cfg = negative_prompt_embeds is not None
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            if added is not None:
                added = {"text_embeds": torch.cat([negative_text_embeds, text_embeds]),
                         "time_ids": torch.cat([negative_time_ids, time_ids])}
        out = self.unet(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                        added_cond_kwargs=added, return_dict=False)[0]
        if not cfg:
            return out
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
        out, cond = _guide(out, guidance_scale)
        if guidance_rescale > 0.0:
            out = rescale_noise_cfg(out, cond, guidance_rescale=guidance_rescale)
        return out


class SD3Adapter:
    """SD3Transformer2DModel (flow matching) as a runtime model. model_kwargs: prompt_embeds, pooled_prompt_embeds,
    and their negative_ versions (present iff guidance is on), guidance_scale."""

    def __init__(self, transformer):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, guidance_scale=1.0):
        cfg = negative_prompt_embeds is not None
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=prompt_embeds,
                               pooled_projections=pooled_prompt_embeds, return_dict=False)[0]
        return _guide(out, guidance_scale)[0] if cfg else out


class FluxAdapter:
    """FluxTransformer2DModel as a runtime model: packed latents [rows, tokens, C], timestep / 1000 as the Flux
    pipeline passes it, the guidance embedding ([B] guidance values, guidance-distilled checkpoints), and true
    classifier-free guidance (true_cfg_scale > 1 with a negative prompt: uncond and cond in one batched call,
    where the pipeline makes two calls). model_kwargs: prompt_embeds, pooled_prompt_embeds, text_ids, img_ids
    (Shared), guidance, negative_* (present iff true CFG is on), true_cfg_scale, and batched_cfg: whether uncond
    and cond share their text ids and shapes, so they can be one batched call (decided once per request)."""

    def __init__(self, transformer):
        self.transformer = transformer

    def _run(self, x, t, prompt_embeds, pooled, text_ids, img_ids, guidance):  # one FluxPipeline transformer call
        return self.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, guidance=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, negative_text_ids=None,
                 true_cfg_scale=1.0, batched_cfg=False):
        if negative_prompt_embeds is None:
            return self._run(x, t, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, guidance)
        if batched_cfg:
            out = self._run(torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([negative_prompt_embeds, prompt_embeds]),
                            torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds]), text_ids, img_ids,
                            None if guidance is None else torch.cat([guidance, guidance]))
            return _guide(out, true_cfg_scale)[0]
        cond = self._run(x, t, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, guidance)
        uncond = self._run(x, t, negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids, img_ids,
                           guidance)
        return uncond + true_cfg_scale * (cond - uncond)


def model_adapter(pipe):
    """The runtime model for a pipeline's denoiser (stateless: every per-request input is a model kwarg)."""
    fam = family_of(pipe)
    if fam in ("sd", "sdxl"):
        return UNetAdapter(pipe.unet)
    return SD3Adapter(pipe.transformer) if fam == "sd3" else FluxAdapter(pipe.transformer)


# ---------------------------------------------------------------------------------------------- requests


def size_multiple(pipe) -> tuple:
    """(m, why): height and width must be multiples of m, the pipeline's own rule, for the reason `why`."""
    fam, vsf = family_of(pipe), int(pipe.vae_scale_factor)
    if fam in ("sd", "sdxl"):  # the SD / SDXL pipelines require multiples of 8
        return math.lcm(8, vsf), f"multiples of 8 and of the VAE scale factor {vsf}"
    if fam == "sd3":
        p = int(pipe.transformer.config.patch_size)
        return vsf * p, f"VAE scale factor {vsf} x transformer patch size {p}"
    return vsf * 2, f"VAE scale factor {vsf} x 2 for the 2 x 2 latent packing"


def default_size(pipe) -> tuple:
    fam, vsf = family_of(pipe), int(pipe.vae_scale_factor)
    if fam == "sd":
        s = pipe.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s[:2]
        return h * vsf, w * vsf
    return pipe.default_sample_size * vsf, pipe.default_sample_size * vsf


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


def _batch(prompt) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")


def _noise(shape, generator, device, dtype, latents):
    from diffusers.utils.torch_utils import randn_tensor

    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype)
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"a list of {len(generator)} generators for a batch of {shape[0]} images")
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def prepare(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
            num_images=1, generator=None, seed=None, scheduler=None, latents=None, eta=0.0, guidance_rescale=0.0,
            true_cfg_scale=1.0, max_sequence_length=None, clip_skip=None) -> Request:
    """Encode the prompt and draw the initial noise the way the pipeline's __call__ does.

    guidance_scale: classifier-free guidance for sd / sdxl / sd3 (on when > 1), the guidance *embedding* for
    flux (guidance-distilled checkpoints); flux's classifier-free guidance is true_cfg_scale > 1 with a
    negative_prompt, as in FluxPipeline. guidance_rescale: sd / sdxl only. eta: DDIM only.
    generator (one torch.Generator, or a list with one per image for deterministic schedulers) or seed
    (a CPU generator seeded with it) as in `pipe(..., generator=torch.Generator().manual_seed(seed))`."""
    fam = family_of(pipe)
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    steps = DEFAULT_STEPS[fam] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    guidance_scale = DEFAULT_GUIDANCE[fam] if guidance_scale is None else float(guidance_scale)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if guidance_rescale and fam not in ("sd", "sdxl"):
        raise ValueError(f"guidance_rescale is not supported by the {fam} pipeline (only sd, sdxl)")
    if true_cfg_scale != 1.0 and fam != "flux":
        raise ValueError(f"true_cfg_scale is a Flux option; use guidance_scale for the {fam} family")
    height, width = check_size(pipe, height, width)
    sched = make_scheduler(pipe, scheduler)
    batch = _batch(prompt) * num_images
    prompt = list(prompt) if isinstance(prompt, tuple) else prompt  # the pipelines test isinstance(prompt, list)
    if isinstance(negative_prompt, tuple):
        negative_prompt = list(negative_prompt)
    if isinstance(prompt, (list, tuple)) and isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)  # the pipelines want matching types
    device = pipe._execution_device
    vsf = int(pipe.vae_scale_factor)
    seq = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    if seq and fam not in ("sd3", "flux"):
        raise ValueError(f"max_sequence_length is a T5 option (sd3, flux), not for the {fam} family")
    timesteps_kwargs = None
    kw = {}

    if fam in ("sd", "sdxl"):
        cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        if fam == "sd":
            pos, neg = pipe.encode_prompt(prompt, device, num_images, cfg, negative_prompt, clip_skip=clip_skip)
        else:
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg,
                negative_prompt=negative_prompt, clip_skip=clip_skip)
            proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
            ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                         text_encoder_projection_dim=proj).to(device).repeat(batch, 1)
            kw.update(text_embeds=pooled.to(device), time_ids=ids)
            if cfg:  # the pipeline's default negative time ids equal the positive ones
                kw.update(negative_text_embeds=neg_pooled.to(device), negative_time_ids=ids)
        kw.update(prompt_embeds=pos.to(device), guidance_scale=guidance_scale, guidance_rescale=float(guidance_rescale))
        if cfg:
            kw["negative_prompt_embeds"] = neg.to(device)
        if pipe.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(guidance_scale - 1).repeat(batch)
            kw["timestep_cond"] = pipe.get_guidance_scale_embedding(
                w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=pos.dtype)
        shape = (batch, pipe.unet.config.in_channels, height // vsf, width // vsf)
        x = _noise(shape, generator, device, pos.dtype, latents)

    elif fam == "sd3":
        cfg = guidance_scale > 1
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, clip_skip=clip_skip, **seq)
        kw.update(prompt_embeds=pos, pooled_prompt_embeds=pooled, guidance_scale=guidance_scale)
        if cfg:
            kw.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        shape = (batch, pipe.transformer.config.in_channels, height // vsf, width // vsf)
        x = _noise(shape, generator, device, pos.dtype, latents)
        c = sched.config
        if c.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
            p = pipe.transformer.config.patch_size
            mu = calculate_shift((shape[2] // p) * (shape[3] // p), c.get("base_image_seq_len", 256),
                                 c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))
            timesteps_kwargs = {"mu": mu}

    else:  # flux
        if clip_skip is not None:
            raise ValueError("clip_skip is not supported by the flux pipeline")
        pos, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                   num_images_per_prompt=num_images, **seq)
        kw.update(prompt_embeds=pos, pooled_prompt_embeds=pooled, text_ids=Shared(text_ids))
        if true_cfg_scale > 1 and negative_prompt is not None:
            neg, neg_pooled, neg_ids = pipe.encode_prompt(prompt=negative_prompt, prompt_2=None, device=device,
                                                          num_images_per_prompt=num_images, **seq)
            kw.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                      negative_text_ids=Shared(neg_ids), true_cfg_scale=float(true_cfg_scale),
                      batched_cfg=neg.shape == pos.shape and torch.equal(neg_ids, text_ids))
        ch = pipe.transformer.config.in_channels // 4
        h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
        if latents is None:
            x = pipe._pack_latents(_noise((batch, ch, h, w), generator, device, pos.dtype, None), batch, ch, h, w)
        else:
            x = _noise((batch, (h // 2) * (w // 2), ch * 4), generator, device, pos.dtype, latents)
        kw["img_ids"] = Shared(pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, pos.dtype))
        if pipe.transformer.config.guidance_embeds:
            kw["guidance"] = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
        c = sched.config
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        mu = calculate_shift(x.shape[1], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        timesteps_kwargs = {"mu": mu}
        if not c.get("use_flow_sigmas", False):
            timesteps_kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()

    step_kwargs = {"eta": float(eta)} if type(sched).__name__ == "DDIMScheduler" else {}
    if eta and not step_kwargs:
        raise ValueError(f"eta is a DDIM option; the scheduler is {type(sched).__name__}")
    traj = Trajectory.from_scheduler(sched, steps, timesteps_kwargs, **step_kwargs)
    run_gen = generator
    if isinstance(generator, list):
        if any(traj.noisy):
            raise ValueError(f"a list of generators works only with deterministic schedulers; "
                             f"{traj.scheduler_name} draws noise at every step: pass one torch.Generator")
        run_gen = None
    return Request(fam, height, width, steps, x, kw, traj, run_gen, generator, step_kwargs)


@torch.no_grad()
def run(pipe, request: Request, *, mode="aggressive", parallel=None, sampler=None, progress=False, **sample_kwargs):
    """Sample a prepared request through the runtime; returns the SampleOutput (final latents in `.sample`).

    sampler: a persistent `driffusion_rt.Sampler` built on `model_adapter(pipe)` (its buffers and CUDA graphs
    then live across requests); None runs `driffusion_rt.sample` (a fresh one). sample_kwargs: further options
    of `sample` (e.g. drafts=). A request drawing per-step noise (DDPM, DDIM eta > 0) consumes its generator:
    prepare a new request to repeat it."""
    opts = dict(steps=request.steps, mode=mode, parallel=parallel, generator=request.generator,
                model_kwargs=request.model_kwargs, progress=progress, **sample_kwargs)
    if sampler is not None:
        return sampler(request.trajectory, request.latents, **opts)
    return sample(model_adapter(pipe), request.trajectory, request.latents, **opts)


# ---------------------------------------------------------------------------------------------- decoding


def output_class(pipe):
    """The pipeline's own output class (StableDiffusionPipelineOutput, ..., FluxPipelineOutput)."""
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
    return {"sd": StableDiffusionPipelineOutput, "sdxl": StableDiffusionXLPipelineOutput,
            "sd3": StableDiffusion3PipelineOutput, "flux": FluxPipelineOutput}[family_of(pipe)]


@torch.no_grad()
def decode(pipe, latents, *, height, width, output_type="pil", generator=None, return_dict=True):
    """VAE-decode final latents as the pipeline's __call__ does after its loop and return what it returns:
    its output class (`.images`; SD also `.nsfw_content_detected`), or a tuple with return_dict=False.

    output_type: "latent" (the latents as they are, Flux's packed), "pt", "np" or "pil". Call it on one rank."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    fam, vae = family_of(pipe), pipe.vae
    nsfw = None
    if output_type == "latent":
        image = latents
    elif fam == "sd":
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm)
    elif fam == "sdxl":
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.device), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    else:
        if fam == "flux":
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.device), return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    if fam == "sd":
        return output_class(pipe)(images=image, nsfw_content_detected=nsfw) if return_dict else (image, nsfw)
    return output_class(pipe)(images=image) if return_dict else (image,)


def _is_rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def text_to_image(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
                  num_images=1, seed=None, generator=None, scheduler=None, mode="aggressive", parallel=None,
                  output_type="pil", eta=0.0, guidance_rescale=0.0, true_cfg_scale=1.0, max_sequence_length=None,
                  clip_skip=None, latents=None, progress=False, sampler=None, **sample_kwargs) -> tuple:
    """Generate images from a prompt through the draft-and-refine runtime. Returns (images, stats).

    images: as the pipeline returns them for output_type ("pil": list of PIL images, "np": [N, H, W, 3] floats,
    "pt": [N, 3, H, W], "latent": the final latents). stats: the run's SampleStats. Under torchrun every rank
    calls this; only rank 0 decodes, the other ranks get images=None. mode="sequential" equals
    `pipe(prompt, ..., generator=torch.Generator().manual_seed(seed))` with the same scheduler. See `prepare`
    for the per-family meaning of guidance_scale / true_cfg_scale, `run` for sampler / sample_kwargs; progress
    shows a bar of rounds on rank 0."""
    req = prepare(pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                  height=height, width=width, num_images=num_images, generator=generator, seed=seed,
                  scheduler=scheduler, latents=latents, eta=eta, guidance_rescale=guidance_rescale,
                  true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length, clip_skip=clip_skip)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
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
    of `driffusion_rt.sample` (e.g. drafts=). Other attributes are forwarded to the wrapped pipeline."""

    def __init__(self, pipe, mode="aggressive", parallel=None, scheduler=None, progress=False, **sample_kwargs):
        family_of(pipe)
        self.pipe, self.mode, self.parallel, self.scheduler = pipe, mode, parallel, scheduler
        self.progress, self.sample_kwargs = progress, sample_kwargs
        self.last_stats: SampleStats | None = None
        self.model = model_adapter(pipe)
        self._sampler = None

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def sampler(self):
        """Built on first use, so a process group initialised after wrapping is picked up."""
        if self._sampler is None:
            from ..distributed import default_evaluator
            self._sampler = Sampler(self.model, default_evaluator(self.model))
        return self._sampler

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=None, guidance_scale=None, height=None,
                 width=None, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True, eta=0.0,
                 guidance_rescale=0.0, true_cfg_scale=1.0, max_sequence_length=None, clip_skip=None, latents=None):
        if prompt is None:
            raise ValueError("prompt is required (precomputed prompt embeddings are not supported)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        req = prepare(self.pipe, prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=height, width=width, num_images=num_images_per_prompt,
                      generator=generator, scheduler=self.scheduler, latents=latents, eta=eta,
                      guidance_rescale=guidance_rescale, true_cfg_scale=true_cfg_scale,
                      max_sequence_length=max_sequence_length, clip_skip=clip_skip)
        out = run(self.pipe, req, mode=self.mode, parallel=self.parallel, sampler=self.sampler,
                  progress=self.progress, **self.sample_kwargs)
        self.last_stats = out.stats
        if not _is_rank0():
            fam = req.family
            none = (None, None) if fam == "sd" else (None,)
            return none if not return_dict else (
                output_class(self.pipe)(images=None, nsfw_content_detected=None) if fam == "sd"
                else output_class(self.pipe)(images=None))
        return decode(self.pipe, out.sample, height=req.height, width=req.width, output_type=output_type,
                      generator=req.decode_generator, return_dict=return_dict)
