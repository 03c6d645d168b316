"""Model services: a loaded model replica and how it turns a request (a plain JSON-able dict) into a sampler call
and the sampler's result into images. The one-shot CLI (generate.py) and the persistent engine (engine.py) share
them, so the same request gives the same image through both.

Request keys: prompt, negative_prompt, steps, guidance_scale, height, width, seed, num_images, scheduler; video
pipelines also num_frames and fps; image pipelines also image, mask_image, control_image (base64 PNG / JPEG),
strength, controlnet_conditioning_scale and lora_scale (sampling options such as mode and parallel are the caller's;
see `sampling_options`).

Everything about a request can be checked before any weights load: `inspect_model` reads what the model reference
names (a built-in model, a pipeline directory's configs, a hub id's configs, failing fast and saying why when it
cannot be found), and `check_request` validates a request against it and returns every resolved value (defaults
filled in). Image inputs are decoded and checked there too (format, size, the request's image bytes, strength,
one control image per ControlNet); what needs the loaded pipeline (its UNet, the control images' sizes against the
output) is checked by the loaded service's `check`, which runs the same checks and then those.
"""
import base64
import dataclasses
import binascii
import hashlib
import io
import json
import math
import numbers
import os
import re
from dataclasses import dataclass

import torch

from .parasolver import MODES as ITERATIVE_MODES
from .plan import MODES
from .sampler import DRAFT_RULES
from .trajectory import Trajectory

SCHEDULERS = ("ddim", "ddpm", "euler", "flow")
BUILTIN = ("digits", "gmm", "fixed")
MODEL_KEYS = ("prompt", "negative_prompt", "steps", "guidance_scale", "height", "width", "seed", "num_images",
              "scheduler", "num_frames", "fps",  # num_frames, fps: video pipelines only (video_service.py)
              "image", "mask_image", "control_image", "strength", "controlnet_conditioning_scale", "lora_scale")
IMAGE_KEYS = ("image", "mask_image", "control_image")  # base64 PNG / JPEG (control_image: one, or one per net)
CONDITIONING_KEYS = IMAGE_KEYS + ("strength", "controlnet_conditioning_scale", "lora_scale")  # image pipelines only
IMAGE_FORMATS = ("PNG", "JPEG")
SAMPLING_KEYS = ("mode", "parallel", "drafts", "subintervals", "preconditioning", "window", "tolerance")
HUB_TIMEOUT_S = 10.0  # one attempt to reach the hub before saying there is no network


class RequestError(ValueError):
    """A request that cannot be served as given; the message names the bad value and what is allowed."""


class ModelUnavailable(RequestError):
    """--model names nothing that can be loaded: a missing local path, a hub id without network, an unknown id."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds on every request, the same for the server and the command line (None: no bound)."""
    prompt_chars: int | None = 1000
    side: int | None = 2048        # height and width, pixels
    steps: int | None = 200
    images: int | None = 16        # images per request (num_images), and digits in a digits prompt
    parallel: int | None = 64
    frames: int | None = 257       # frames per video (video pipelines)
    image_bytes: int | None = 8 << 20  # the request's images together (image, mask_image, control_image), decoded


NO_LIMITS = Limits(None, None, None, None, None, None, None)
JSON_BYTES = 1 << 16  # a request's JSON besides its images
LIMIT_FLAGS = (("prompt_chars", "--max-prompt-chars", "longest prompt accepted, characters"),
               ("side", "--max-side", "largest height or width accepted, pixels"),
               ("steps", "--max-steps", "most sampling steps accepted"),
               ("images", "--max-images", "most images (videos) per request, and digits in a digits prompt"),
               ("parallel", "--max-parallel", "largest parallel n accepted"),
               ("frames", "--max-frames", "most frames per video accepted"),
               ("image_bytes", "--max-image-bytes", "most bytes of input images (image, mask_image, control_image "
                                                    "together, decoded) per request; the request size limit grows "
                                                    "with it"))


def request_bytes(limits: Limits) -> int:
    """The largest encoded request the engine and the server accept: the JSON fields plus the images as base64."""
    return JSON_BYTES + (0 if not limits.image_bytes else -(-limits.image_bytes // 3) * 4)


def add_limit_flags(parser):
    """The --max-* flags, shared by the command line and the server so that both enforce the same limits."""
    g = parser.add_argument_group("request limits (the same for the command line and the server)")
    for field_name, flag, text in LIMIT_FLAGS:
        g.add_argument(flag, type=int, default=getattr(Limits(), field_name),
                       help=f"{text} (default {getattr(Limits(), field_name)})")


def limits_from_args(args) -> Limits:
    """Limits from the parsed --max-* flags; raises RequestError for a value below 1."""
    values = {}
    for field_name, flag, _ in LIMIT_FLAGS:
        v = getattr(args, flag[2:].replace("-", "_"))
        if v < 1:
            raise RequestError(f"{flag} must be >= 1, got {v}")
        values[field_name] = v
    return Limits(**values)


@dataclass
class Request:
    """A validated request, ready for the sampler: scheduler (or trajectory), steps, unit noise, model kwargs."""
    spec: dict
    scheduler: object
    steps: int
    latent: torch.Tensor
    model_kwargs: dict | None = None
    generator: torch.Generator | None = None   # the stochastic steps' noise (matters on rank 0)
    resolved: dict | None = None               # every request value with defaults filled in (check_request)
    start: int = 0                             # img2img / inpainting: the first index of the schedule run
    blend: object = None                       # inpainting with a 4-channel UNet: the per-state mask blend


def _int(spec, key, lo, hi=None, default=None):
    v = spec.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestError(f"{key} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise RequestError(f"{key}={v} is out of range: allowed {lo}..{hi if hi is not None else 'any'}")
    return v


def sampling_options(spec: dict, limits: Limits = NO_LIMITS) -> dict:
    """The sampler keyword options of a request (mode, parallel, drafts, ParaSolver's), validated."""
    unknown = sorted(set(spec) - set(MODEL_KEYS) - set(SAMPLING_KEYS))
    if unknown:
        raise RequestError(f"unknown request field(s) {unknown}; allowed: {', '.join(MODEL_KEYS + SAMPLING_KEYS)} "
                           f"(and response, over HTTP)")
    mode = spec.get("mode", "aggressive")
    if mode not in MODES + ITERATIVE_MODES:
        raise RequestError(f"unknown mode {mode!r}; choose one of {', '.join(MODES + ITERATIVE_MODES)}")
    opts = {"mode": mode, "parallel": _int(spec, "parallel", 1, limits.parallel)}
    if mode in ITERATIVE_MODES:
        for key, lo in (("subintervals", 1), ("preconditioning", 0), ("window", 1)):
            if spec.get(key) is not None:
                opts[key] = _int(spec, key, lo, limits.steps)
        if spec.get("tolerance") is not None:
            tol = spec["tolerance"]
            if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
                raise RequestError(f"tolerance must be a number >= 0, got {tol!r}")
            opts["tolerance"] = float(tol)
    else:
        extra = sorted(k for k in ("subintervals", "preconditioning", "window", "tolerance") if spec.get(k) is not None)
        if extra:
            raise RequestError(f"{extra} apply to modes picard and parasolver only, not mode={mode!r}")
        drafts = spec.get("drafts", "jump")
        if drafts not in DRAFT_RULES:
            raise RequestError(f"unknown drafts {drafts!r}; choose one of {', '.join(DRAFT_RULES)}")
        opts["drafts"] = drafts
    return opts


def _common(spec, limits: Limits, default_steps: int, video: bool = False) -> dict:
    if not video:
        for key in ("num_frames", "fps"):
            if spec.get(key) is not None:
                from .video_service import video_families
                raise RequestError(f"{key} applies to video pipelines ({video_families()}); this model makes images")
    steps = _int(spec, "steps", 1, limits.steps, default_steps)
    seed = _int(spec, "seed", 0, 2**63 - 1, 0)
    num = _int(spec, "num_images", 1, limits.images)
    g = spec.get("guidance_scale")
    if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or not -100 <= g <= 100):
        raise RequestError(f"guidance_scale must be a number in -100..100, got {g!r}")
    prompt = spec.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
    if prompt is not None and limits.prompt_chars is not None and len(prompt) > limits.prompt_chars:
        raise RequestError(f"prompt has {len(prompt)} characters; the limit is {limits.prompt_chars}")
    return {"steps": steps, "seed": seed, "num_images": num, "guidance_scale": g, "prompt": prompt}


def _decode_image(value, key: str, limits: Limits, budget: list) -> tuple:
    """decode_image, and the image as the resolved values name it (format, size, digest of the file's bytes)."""
    from PIL import Image
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a base64-encoded PNG or JPEG string, got {type(value).__name__}")
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{key} is not valid base64: {e}") from None
    if budget[0] is not None:
        budget[0] -= len(raw)
        if budget[0] < 0:
            raise RequestError(f"the request's images are over {limits.image_bytes} bytes")
    try:
        im = Image.open(io.BytesIO(raw))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{key} cannot be read as an image: {type(e).__name__}: {e}") from None
    if im.format not in IMAGE_FORMATS:
        raise RequestError(f"{key} is a {im.format} image; allowed: {', '.join(IMAGE_FORMATS)}")
    if limits.side is not None and max(im.size) > limits.side:
        raise RequestError(f"{key} is {im.size[0]}x{im.size[1]} pixels; the limit is {limits.side} per side")
    try:  # the header is read: decode the pixels only now that the size is known to be in bounds
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{key} cannot be read as an image: {type(e).__name__}: {e}") from None
    info = {"format": im.format, "height": im.height, "width": im.width,
            "sha256": hashlib.sha256(raw).hexdigest()[:16]}
    return im.convert("RGB"), info


def decode_image(value, key: str, limits: Limits = NO_LIMITS, budget: list | None = None):
    """A request's image field (base64 of a PNG or JPEG file, optionally as a data: URL) as a PIL image (RGB),
    with the limits checked from the header before the pixels are decoded. budget: [bytes left] shared by the
    request's images (default: limits.image_bytes for this image alone)."""
    return _decode_image(value, key, limits, [limits.image_bytes] if budget is None else budget)[0]


def encode_image_file(path: str) -> str:
    """A file's bytes as the base64 string of a request's image field (the command line's --image and co.)."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def _not_for(spec, keys, model: str, why: str):
    for key in keys:
        if spec.get(key) is not None:
            raise RequestError(f"{key} does not apply to the {model} model ({why})")


def check_digits(spec: dict, limits: Limits = NO_LIMITS) -> dict:
    """Validate a digits request; the resolved values (labels: the digits of one image)."""
    from . import digits as d
    r = _common(spec, limits, 50)
    _not_for(spec, ("height", "width", "negative_prompt"), "digits", f"it draws {d.RESOLUTION}x{d.RESOLUTION} digits")
    _not_for(spec, CONDITIONING_KEYS, "digits", "image inputs and LoRA scales apply to diffusers pipelines")
    name = spec.get("scheduler") or "ddim"
    if name not in d.SCHEDULERS:
        raise RequestError(f"scheduler {name!r} is not available for the digits model; choose one of "
                           f"{', '.join(d.SCHEDULERS)}")
    prompt = "0123456789" if r["prompt"] is None else r["prompt"]
    try:
        labels = d.parse_prompt(prompt)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if limits.images is not None and len(labels) > limits.images:
        raise RequestError(f"the prompt asks for {len(labels)} digits; the limit is {limits.images} per image")
    g = d.DEFAULT_GUIDANCE if r["guidance_scale"] is None else float(r["guidance_scale"])
    return dict(r, prompt=prompt, labels=labels.tolist(), num_images=r["num_images"] or 1, guidance_scale=g,
                scheduler=name, height=None, width=None, negative_prompt=None)


def check_toy(name: str, spec: dict, limits: Limits = NO_LIMITS) -> dict:
    """Validate a gmm / fixed request (no prompt: they sample a fixed distribution or cost)."""
    r = _common(spec, limits, 50)
    _not_for(spec, ("prompt", "negative_prompt", "height", "width", "guidance_scale") + CONDITIONING_KEYS, name,
             "it has no conditioning and no image size")
    sched = spec.get("scheduler") or "ddim"
    if sched not in SCHEDULERS:
        raise RequestError(f"scheduler {sched!r} is not one of {', '.join(SCHEDULERS)}")
    return dict(r, num_images=r["num_images"] or 4, scheduler=sched, height=None, width=None, negative_prompt=None)


@dataclass(frozen=True)
class PipelineRules:
    """What a request is checked against for a pipeline, from its configs (no weights needed)."""
    family: str
    multiple: int | None     # height and width must be multiples of this (None: checked once loaded)
    why: str                 # ... for this reason
    default_size: tuple | None  # (height, width) when a request names none (None: known once loaded)
    scheduler: str           # the scheduler used when a request names none
    video: bool = False      # a video family: num_frames (its rule checked once loaded) and fps
    task: str = "text2img"   # the pipeline's task by its class (conditioning.TASKS); controlnet with ControlNets
    nets: int = 0            # ControlNets: control images per request
    vae_scale: int | None = None  # sizes taken from an input image round down to multiples of this


def check_pipeline(spec: dict, rules: PipelineRules, limits: Limits = NO_LIMITS) -> dict:
    """Validate a text-to-image (or text-to-video) request for a pipeline without encoding prompts or drawing
    noise. Video requests also get num_frames (at most limits.frames) and fps checked here; a video family's frame
    rule and default fps need the loaded pipeline (VideoService.check). Image inputs are decoded and checked
    (`check_conditioning`); the resolved values name them by size and digest."""
    return _check_pipeline(spec, rules, limits)[0]


def _check_pipeline(spec: dict, rules: PipelineRules, limits: Limits) -> tuple:
    """check_pipeline's resolved values, and the request's decoded images ({key: PIL image or list})."""
    from . import pipelines as p
    r = _common(spec, limits, p.DEFAULT_STEPS[rules.family], video=rules.video)
    prompt = r["prompt"]
    if not prompt or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty string for the {rules.family} pipeline")
    neg = spec.get("negative_prompt")
    if neg is not None and (not isinstance(neg, str) or (limits.prompt_chars and len(neg) > limits.prompt_chars)):
        raise RequestError(f"negative_prompt must be a string of at most {limits.prompt_chars} characters")
    name = spec.get("scheduler")
    if name is not None and name not in p.SCHEDULERS[rules.family]:
        raise RequestError(f"scheduler {name!r} is not supported for {rules.family} pipelines; choose one of "
                           f"{', '.join(p.SCHEDULERS[rules.family])}")
    given = [_int(spec, key, 1, limits.side) for key in ("height", "width")]
    cond, images = check_conditioning(spec, rules, limits, r["steps"])
    size = []
    for key, v, default, derived in zip(("height", "width"), given, rules.default_size or (None, None),
                                        _size_from_image(cond, images, rules)):
        where = ""
        if v is None:
            v, where = (default, "") if derived is None else (derived, " (the input image's, rounded down)")
        if v is not None and rules.multiple is not None and v % rules.multiple:
            lo = v - v % rules.multiple
            hint = f"{lo} or {lo + rules.multiple}" if lo else f"{rules.multiple}"
            raise RequestError(f"{key}={v}{where} is not a multiple of {rules.multiple}, which the {rules.family} "
                               f"pipeline needs ({rules.why}); use e.g. {hint}")
        size.append(v)
    g = p.DEFAULT_GUIDANCE[rules.family] if r["guidance_scale"] is None else float(r["guidance_scale"])
    r = dict(r, negative_prompt=neg, num_images=r["num_images"] or 1, guidance_scale=g,
             scheduler=name or rules.scheduler, height=size[0], width=size[1], **cond)
    if rules.video:
        from .video_service import MAX_FPS
        r.update(num_frames=_int(spec, "num_frames", 1, limits.frames), fps=_int(spec, "fps", 1, MAX_FPS))
    return r, images


def _size_from_image(cond: dict, images: dict, rules: PipelineRules) -> tuple:
    """(height, width) a request without a size takes from its input image, as the pipelines do (ControlNet: the
    control image; SD / SDXL img2img: the init image; rounded down to the VAE's factor), else (None, None)."""
    from .pipelines import REGISTRY
    im = None
    if cond.get("task") == "controlnet":
        im = images["control_image"][0]
    elif cond.get("task") == "img2img" and getattr(REGISTRY[rules.family], "img2img_size_from_image", False):
        im = images["image"]
    if im is None or not rules.vae_scale:
        return None, None
    return tuple(v - v % rules.vae_scale for v in (im.height, im.width))


def check_conditioning(spec: dict, rules: PipelineRules, limits: Limits = NO_LIMITS, steps: int | None = None):
    """A request's image inputs and LoRA scale, checked before the model loads: which task they ask for and
    whether the pipeline has it, the images decoded (format, size, the request's image bytes), strength (default:
    the pipeline's) and whether it keeps a step, one control image and scale per ControlNet. Returns (resolved
    fields, {key: decoded PIL image, or a list of them for control_image})."""
    from .pipelines import REGISTRY, conditioning
    from .strength import check_strength, kept_steps
    given = [k for k in CONDITIONING_KEYS if spec.get(k) is not None]
    if rules.video:
        if given:
            raise RequestError(f"{given[0]} applies to image pipelines ({image_families()}); this model makes videos")
        return {}, {}
    lora_scale = spec.get("lora_scale")
    if lora_scale is not None and (isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real)
                                   or not math.isfinite(lora_scale)):
        raise RequestError(f"lora_scale must be a finite number, got {lora_scale!r}")
    family = REGISTRY[rules.family]
    image, mask, control = (spec.get(k) for k in IMAGE_KEYS)
    strength, scale = spec.get("strength"), spec.get("controlnet_conditioning_scale")
    out = dict(task="text2img", image=None, mask_image=None, control_image=None, strength=None,
               controlnet_conditioning_scale=None, lora_scale=None if lora_scale is None else float(lora_scale))
    budget, images = [limits.image_bytes], {}
    if rules.task == "controlnet":
        extra = [k for k, v in (("image", image), ("mask_image", mask), ("strength", strength)) if v is not None]
        if extra or control is None:
            raise RequestError(f"this server runs a ControlNet pipeline: requests take control_image (and "
                               f"controlnet_conditioning_scale), not {', '.join(extra) or 'no image'}")
        controls = control if isinstance(control, list) else [control]
        if len(controls) != rules.nets:
            raise RequestError(f"control_image has {len(controls)} image(s) for {rules.nets} ControlNet(s): pass one "
                               f"per ControlNet (a list for several)")
        keys = [f"control_image[{i}]" for i in range(len(controls))] if isinstance(control, list) else ["control_image"]
        decoded = [_decode_image(c, k, limits, budget) for c, k in zip(controls, keys)]
        try:
            scales = conditioning._per_net(1.0 if scale is None else scale, rules.nets,
                                           "controlnet_conditioning_scale", numbers.Real)
        except ValueError as e:
            raise RequestError(str(e)) from None
        images["control_image"] = [im for im, _ in decoded]
        out.update(task="controlnet", control_image=[info for _, info in decoded],
                   controlnet_conditioning_scale=scales)
        return out, images
    if control is not None or scale is not None:
        raise RequestError("control_image needs a server started with --controlnet (ControlNet pipelines: "
                           f"{conditioning._families_with('controlnet')})")
    if mask is not None and image is None:
        raise RequestError("mask_image needs image (the picture to inpaint)")
    if image is None:
        if strength is not None:
            raise RequestError("strength applies to requests with an image")
        if rules.task == "inpaint":
            raise RequestError(f"this {rules.family} pipeline is an inpainting pipeline: requests need image and "
                               f"mask_image")
        return out, images
    task = "img2img" if mask is None else "inpaint"
    try:
        conditioning._require(family, task)
        strength = conditioning.family_default_strength(family, task) if strength is None \
            else check_strength(strength)
        if steps is not None:
            kept_steps(steps, strength, family.strength_rule)
    except ValueError as e:
        raise RequestError(str(e)) from None
    images["image"], out["image"] = _decode_image(image, "image", limits, budget)
    if mask is not None:
        images["mask_image"], out["mask_image"] = _decode_image(mask, "mask_image", limits, budget)
    out.update(task=task, strength=strength)
    return out, images


def image_families() -> str:
    from .pipelines import REGISTRY
    return ", ".join(f.name for f in REGISTRY.values() if not getattr(f, "video", False))


def _scheduler_name(scheduler) -> str:
    """The short name of a scheduler instance (driffusion_rt.schedulers), else its class name."""
    from . import schedulers as named
    return named.name_of(scheduler) or type(scheduler).__name__


def _rules(family: str, vae_scale: int, patch: int, default_size: tuple, scheduler: str,
           task: str = "text2img") -> PipelineRules:
    """The size rule of each image family (as its diffusers pipeline enforces it): the same rule as the family's
    size_multiple (tests compare the two on every family). Video families' rules are read once loaded."""
    from . import pipelines as p
    if getattr(p.REGISTRY[family], "video", False):
        return PipelineRules(family, None, "", None, scheduler, video=True)
    if family in ("sd", "sdxl"):
        mult, why = math.lcm(8, vae_scale), f"multiples of 8 and of the VAE scale factor {vae_scale}"
    elif family == "sd3":
        mult, why = vae_scale * patch, f"VAE scale factor {vae_scale} x transformer patch size {patch}"
    elif family == "flux":
        mult, why = vae_scale * 2, f"VAE scale factor {vae_scale} x 2 for the 2 x 2 latent packing"
    else:  # a family registered later: its size rule is checked once loaded
        return PipelineRules(family, None, "", None, scheduler, task=task)
    return PipelineRules(family, mult, why, tuple(int(v) for v in default_size), scheduler, task=task,
                         vae_scale=int(vae_scale))


def rules_of_pipe(pipe) -> PipelineRules:
    """PipelineRules of a loaded pipeline (its family's own size rule, default size and scheduler)."""
    from . import pipelines as p
    from .pipelines import conditioning
    fam = p.family_of(pipe)
    mult, why = p.size_multiple(pipe)
    video = getattr(p.REGISTRY[fam], "video", False)
    task = "text2img" if video else conditioning.task_of(pipe)
    return PipelineRules(fam, int(mult), why, tuple(int(v) for v in p.default_size(pipe)),
                         _scheduler_name(pipe.scheduler), video, task, len(conditioning._nets(pipe)),
                         None if video else int(pipe.vae_scale_factor))


def rules_of_configs(configs: dict) -> PipelineRules:
    """PipelineRules from a pipeline's model_index.json and component configs (what diffusers' pipelines derive
    at load time: the VAE scale factor from the VAE's blocks, the default size from the denoiser's sample size)."""
    import diffusers

    from . import pipelines as p
    from .pipelines import conditioning
    cls_name = configs["model_index"].get("_class_name")
    fam = p.family_of_class(cls_name)
    vae = configs.get("vae") or {}
    vsf = 2 ** (len(vae["block_out_channels"]) - 1) if vae.get("block_out_channels") else 8
    den = configs.get("unet") or configs.get("transformer") or {}
    # FluxPipeline's default_sample_size is 128; the others read the denoiser's sample_size
    sample = 128 if fam == "flux" else (den.get("sample_size") or (64 if fam == "sd" else 128))
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample[:2])
    patch = int(den.get("patch_size", 1)) if fam == "sd3" else 1
    cfg = configs.get("scheduler") or {}
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    scheduler = _scheduler_name(cls.from_config(cfg)) if cls is not None else str(cfg.get("_class_name"))
    task = conditioning._classes(p.REGISTRY[fam]).get(cls_name, "text2img")
    rules = _rules(fam, vsf, patch, (h * vsf, w * vsf), scheduler, task)
    return dataclasses.replace(rules, nets=1) if task == "controlnet" else rules  # a saved ControlNet pipeline


# ------------------------------------------------------------------------------------- the model reference


@dataclass(frozen=True)
class ModelRef:
    """What --model names, found out without loading weights."""
    arg: str                          # as given
    name: str                         # short name for output files and logs
    kind: str                         # digits, gmm, fixed or pipeline
    source: str = "builtin"           # builtin, local (a directory) or hub
    rules: PipelineRules | None = None
    loras: tuple = ()                 # (path, scale) of each LoRA loaded at start
    controlnets: tuple = ()           # ControlNetModel directories (the pipeline becomes the family's ControlNet one)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _component_files(index: dict) -> dict:
    """The config files of the components a size check needs: VAE, denoiser, scheduler."""
    files = {}
    for comp in ("vae", "unet", "transformer"):
        if isinstance(index.get(comp), (list, tuple)) and index[comp][0] is not None:
            files[comp] = f"{comp}/config.json"
    files["scheduler"] = "scheduler/scheduler_config.json"
    return files


def _local_configs(path: str) -> dict:
    from . import pipelines as p
    try:
        index = p.check_model_dir(path)
    except (FileNotFoundError, ValueError) as e:
        raise ModelUnavailable(str(e)) from None
    configs = {"model_index": index}
    for comp, rel in _component_files(index).items():
        f = os.path.join(path, rel)
        if os.path.isfile(f):
            configs[comp] = _read_json(f)
    return configs


def _hub_error(repo: str, e: Exception, cached: bool) -> ModelUnavailable:
    """What went wrong reaching a hub model, in words: gated, unknown, another HTTP answer, or no network."""
    from huggingface_hub import constants, errors
    where = f"model {repo!r} is not a local directory, and the hub ({constants.ENDPOINT})"
    if isinstance(e, errors.GatedRepoError):
        return ModelUnavailable(f"{where} says it is gated: accept its license on the hub and log in (`hf auth login`)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ModelUnavailable(f"{where} has no such model (check the id; private models need `hf auth login`)")
    if isinstance(e, errors.HfHubHTTPError):
        return ModelUnavailable(f"{where} answered {str(e).splitlines()[0]}")
    # DNS, refused or timed-out connections: the HTTP client's own errors
    hint = ("it is in the local cache: set HF_HUB_OFFLINE=1 to load it from there" if cached else
            "it is not in the local cache either; download it on a machine with network (`hf download`) or give a "
            "local pipeline directory")
    why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
    return ModelUnavailable(f"model {repo!r} is not a local directory, and there is no network to the hub "
                            f"({constants.ENDPOINT}: {why}); {hint}")


def _hub_configs(repo: str) -> dict:
    """model_index.json and the component configs of a hub model, from the cache or the hub: fails fast, saying
    whether the machine is offline, has no network, or the hub has no such model (or will not give it)."""
    import huggingface_hub as hub
    from huggingface_hub import constants, errors
    cached = isinstance(hub.try_to_load_from_cache(repo, "model_index.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelUnavailable(f"model {repo!r} is not a local directory, and as a hub id it is not in the local "
                                   f"cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids downloading it")
        fetch = lambda rel: hub.try_to_load_from_cache(repo, rel)  # noqa: E731
    else:
        fetch = lambda rel: hub.hf_hub_download(repo, rel, etag_timeout=HUB_TIMEOUT_S)  # noqa: E731
    try:
        if not constants.HF_HUB_OFFLINE:
            hub.model_info(repo, timeout=HUB_TIMEOUT_S)
        configs = {"model_index": _read_json(fetch("model_index.json"))}
        for comp, rel in _component_files(configs["model_index"]).items():
            try:
                f = fetch(rel)
            except errors.EntryNotFoundError:  # a component without this file; loading will tell if it matters
                continue
            if isinstance(f, str):
                configs[comp] = _read_json(f)
    except ModelUnavailable:
        raise
    except Exception as e:
        raise _hub_error(repo, e, cached) from None
    return configs


def inspect_model(model: str, loras=(), controlnets=()) -> ModelRef:
    """Find out what --model names without loading weights. Raises ModelUnavailable saying what is wrong: a local
    path missing or incomplete, a hub id while offline or without network, or an id the hub does not know; LoRA
    weights ("PATH[:SCALE]") that do not exist, a ControlNet directory without its config, or ControlNets for a
    family that has no ControlNet pipeline."""
    from . import pipelines as p
    if not isinstance(model, str) or not model:
        raise ModelUnavailable(f"model must be digits, gmm, fixed, a pipeline directory or a hub id; got {model!r}")
    if model in BUILTIN and (loras or controlnets):
        raise ModelUnavailable(f"LoRA weights and ControlNets apply to diffusers pipelines, not --model {model}")
    adapters = _check_adapters(loras, controlnets)
    if model in BUILTIN:
        return ModelRef(model, model, model)
    name = model.rstrip("/").split("/")[-1] or model
    if os.path.isdir(model):
        configs, source = _local_configs(model), "local"
    elif os.path.exists(model):
        raise ModelUnavailable(f"model {model!r} is a file, not a pipeline directory (a folder with "
                               f"model_index.json) or a hub id ('org/name')")
    elif not _HUB_ID.match(model):
        raise ModelUnavailable(f"model {model!r}: no such local directory, and it is not a hub id of the form "
                               f"'org/name'")
    else:
        configs, source = _hub_configs(model), "hub"
    try:
        rules = rules_of_configs(configs)
    except ValueError as e:  # an unsupported pipeline class
        raise ModelUnavailable(str(e)) from None
    if rules.family not in p.SCHEDULERS:
        raise ModelUnavailable(f"model {model!r} is a {rules.family} pipeline, which is not supported")
    if controlnets:
        from .pipelines import conditioning
        if conditioning.task_class(p.REGISTRY[rules.family], "controlnet") is None:
            raise ModelUnavailable(f"--controlnet: ControlNet is supported for the "
                                   f"{' and '.join(conditioning._families_with('controlnet').split(', '))} families; "
                                   f"{model} is a {rules.family} pipeline")
        rules = dataclasses.replace(rules, task="controlnet", nets=len(controlnets))
    return ModelRef(model, name, "pipeline", source, rules, *adapters)


def _check_adapters(loras, controlnets) -> tuple:
    """(loras as (path, scale) pairs, ControlNet directories), each checked to exist; raises ModelUnavailable."""
    from .pipelines.lora import check_lora_path, parse_lora
    pairs = []
    try:
        for spec in loras:
            path, scale = parse_lora(spec) if isinstance(spec, str) else tuple(spec)
            check_lora_path(path)
            pairs.append((path, scale))
    except (ValueError, FileNotFoundError) as e:
        raise ModelUnavailable(f"--lora: {e}") from None
    for path in controlnets:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelUnavailable(f"--controlnet {path!r} is not a ControlNetModel directory (no config.json)")
    return tuple(pairs), tuple(controlnets)


def check_request(ref: ModelRef, spec: dict, limits: Limits = NO_LIMITS) -> dict:
    """Validate a request for the model `ref` names, before loading it; returns every resolved value."""
    if ref.kind == "digits":
        return check_digits(spec, limits)
    if ref.kind in ("gmm", "fixed"):
        return check_toy(ref.kind, spec, limits)
    return check_pipeline(spec, ref.rules, limits)


# ------------------------------------------------------------------------------------- loaded services


class DigitsService:
    """The class-conditional digits model shipped in the package: one PNG grid of the prompt's digits per image."""

    def __init__(self, device, dtype=torch.float32, path=None):
        from . import digits
        self.digits, self.device, self.dtype = digits, device, dtype
        self.name = "digits"
        self.unet, _ = digits.load_digits_model(path=path, device=device, dtype=dtype)
        self.path = path
        self.model = digits.DigitsModel(self.unet)

    def check(self, spec: dict, limits: Limits = NO_LIMITS) -> dict:
        return check_digits(spec, limits)

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> Request:
        d, r = self.digits, check_digits(spec, limits)
        labels = torch.tensor(r["labels"]).repeat(r["num_images"])  # image i is rows i*k .. (i+1)*k - 1
        gen = torch.Generator().manual_seed(r["seed"])
        x = torch.randn(len(labels), 1, d.RESOLUTION, d.RESOLUTION, generator=gen).to(self.device, self.dtype)
        kw = {"labels": labels.to(self.device), "guidance_scale": r["guidance_scale"]}
        try:  # the trajectory here, not in the sampler: a scheduler the runtime cannot run is the request's error
            traj = Trajectory.from_scheduler(d.make_scheduler(r["scheduler"], self.path), r["steps"])
        except ValueError as e:
            raise RequestError(str(e)) from None
        return Request(spec, traj, r["steps"], x, kw, gen, r)

    def images(self, out, req) -> list:
        """num_images PIL images, each the grid of the prompt's digits."""
        from PIL import Image
        digits = self.digits.to_images(out.sample)
        k = len(req.resolved["labels"])
        return [Image.fromarray(self.digits.grid(digits[i: i + k]), mode="L") for i in range(0, len(digits), k)]


class PipelineService:
    """A diffusers pipeline (SD 1.5 / 2.1, SDXL, SD3, Flux) loaded once: text-to-image, img2img and inpainting
    requests (image / mask_image), with LoRA weights loaded at start (loras: "PATH[:SCALE]" or (path, scale)), or
    a ControlNet pipeline (controlnets: ControlNetModel directories, one per control image of a request).
    Adapters that cannot be loaded raise RequestError (bad input, found only once loading)."""

    def __init__(self, model: str, device, dtype=torch.float32, loras=(), controlnets=()):
        from . import pipelines
        from .pipelines import conditioning, lora
        self.p, self.cond, self.device = pipelines, conditioning, device
        loras, controlnets = _check_adapters(loras, controlnets)  # a missing file fails before the model loads
        self.pipe = pipelines.load_pipeline(model, dtype=dtype, device=device)
        self.family = pipelines.family_of(self.pipe)
        try:
            if controlnets:
                self.pipe = conditioning.for_task(self.pipe, "controlnet",
                                                  controlnet=_controlnets(controlnets, dtype, device))
            lora.load_loras(self.pipe, loras)
        except ValueError as e:
            raise RequestError(str(e)) from None
        self.rules = rules_of_pipe(self.pipe)
        self.name = model.rstrip("/").split("/")[-1] or model
        self.model = pipelines.model_adapter(self.pipe)

    def check(self, spec: dict, limits: Limits = NO_LIMITS) -> dict:
        """Validate without encoding prompts or drawing noise (what an engine does before accepting a request): the
        checks before loading (check_pipeline), then what needs the pipeline (its UNet for img2img / inpainting,
        the control images' sizes); returns every resolved value."""
        return self._checked(spec, limits)[0]

    def _checked(self, spec: dict, limits: Limits) -> tuple:
        """(resolved values, the request's image inputs as a conditioning object or None)."""
        r, images = _check_pipeline(spec, self.rules, limits)
        if r.get("task", "text2img") == "text2img":  # (video requests have no image inputs)
            return r, None
        cond = self.cond
        try:
            if r["task"] == "controlnet":
                controls = images["control_image"]
                inputs = cond.control(self.pipe, controls[0] if len(controls) == 1 else controls,
                                      r["controlnet_conditioning_scale"])
            elif r["task"] == "inpaint":
                inputs = cond.inpainting(self.pipe, images["image"], images["mask_image"], r["strength"])
            else:
                inputs = cond.img2img(self.pipe, images["image"], r["strength"])
            h, w = inputs.begin(self.pipe, self.p.get_family(self.pipe), height=r["height"], width=r["width"],
                                steps=r["steps"], batch=r["num_images"], num_images=r["num_images"], latents=None)
            h, w = self.p.check_size(self.pipe, h, w)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return dict(r, height=h, width=w), inputs

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> Request:
        r, inputs = self._checked(spec, limits)
        q = self.p.prepare(self.pipe, r["prompt"], negative_prompt=r["negative_prompt"], steps=r["steps"],
                           guidance_scale=r["guidance_scale"], height=r["height"], width=r["width"],
                           num_images=r["num_images"], seed=r["seed"], scheduler=spec.get("scheduler"),
                           conditioning=inputs, lora_scale=r["lora_scale"])
        return Request(spec, q.trajectory, q.steps, q.latents, q.model_kwargs, q.generator, r,
                       start=q.trajectory.start, blend=q.blend)

    def images(self, out, req) -> list:
        return self.p.decode(self.pipe, out.sample, height=req.resolved["height"], width=req.resolved["width"],
                             output_type="pil").images


class ToyService:
    """gmm (the analytic Gaussian mixture, 4x16x16) or fixed (a model that sleeps `cost` seconds per call)."""

    def __init__(self, name: str, device, dtype=torch.float32, cost: float = 0.04):
        from .fixed_cost import FixedCostModel
        from .gmm import GaussianMixture
        self.name, self.device, self.dtype = name, device, dtype
        self.mixture = GaussianMixture.random(8, shape=(4, 16, 16), seed=0)
        self.model = FixedCostModel(cost) if name == "fixed" else _PerRequest()
        builtin_scheduler("ddim")  # imports diffusers' schedulers now rather than in the first request

    def check(self, spec: dict, limits: Limits = NO_LIMITS) -> dict:
        return check_toy(self.name, spec, limits)

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> Request:
        from .gmm import GaussianMixtureModel
        r = self.check(spec, limits)
        traj = Trajectory.from_scheduler(builtin_scheduler(r["scheduler"]), r["steps"])
        kw = None
        if self.name == "gmm":  # the trajectory is a model input: a graph captured for one request serves the next
            self.model.inner = GaussianMixtureModel(self.mixture, traj)
            kw = GaussianMixtureModel.table_kwargs(traj, self.device)
        gen = torch.Generator().manual_seed(r["seed"])
        x = torch.randn(r["num_images"], *self.mixture.shape, generator=gen).to(self.device, self.dtype)
        return Request(spec, traj, r["steps"], x, kw, gen, r)

    def images(self, out, req) -> list:
        return []


class _PerRequest:
    """A stable model object (samplers keep their model) delegating to the current request's model."""
    inner = None

    def __call__(self, x, t, **kwargs):
        return self.inner(x, t, **kwargs)


def builtin_scheduler(name: str):
    """SD-style noise schedules for the toy models."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {"ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sd),
            "ddpm": lambda: DDPMScheduler(clip_sample=False, **sd),
            "euler": lambda: EulerDiscreteScheduler(**sd),
            "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}[name]()


def _controlnets(paths, dtype, device):
    """ControlNetModel(s) from local directories (one: the model, several: a list for a MultiControlNet)."""
    from diffusers import ControlNetModel
    nets = []
    for path in paths:
        try:
            nets.append(ControlNetModel.from_pretrained(path, torch_dtype=dtype).to(device))
        except (OSError, ValueError) as e:
            raise RequestError(f"--controlnet {path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    return nets[0] if len(nets) == 1 else nets


def load_service(model: str, device, dtype=torch.float32, cost: float = 0.04, loras=(), controlnets=()):
    """digits, gmm, fixed, or a diffusers pipeline directory / hub id (with LoRA weights and ControlNets)."""
    if model in BUILTIN and (loras or controlnets):
        raise RequestError(f"LoRA weights and ControlNets apply to diffusers pipelines, not --model {model}")
    if model == "digits":
        return DigitsService(device, dtype)
    if model in ("gmm", "fixed"):
        return ToyService(model, device, dtype, cost)
    service = PipelineService(model, device, dtype, loras, controlnets)
    if getattr(service.p.get_family(service.pipe), "video", False):
        from .video_service import VideoService
        return VideoService(service)
    return service
