"""A request, validated once into a frozen `Request` that every later stage takes (docs/design.md section 5).

    request = parse(spec, model, limits)     # every check a model's rules allow, before any model work
    request = service.admit(request)         # services.py: what only the loaded model can tell (rank 0)
    prepared = service.prepare(request)      # every rank: prompt encoded, noise drawn, trajectory probed

`spec` is a plain mapping of request fields (an HTTP body, or the command line's flags): prompt, negative_prompt,
steps, guidance_scale, height, width, seed, num_images, scheduler; video pipelines num_frames and fps; image
pipelines image, mask_image, control_image (PNG / JPEG files as bytes, or base64 strings as JSON carries them),
strength, controlnet_conditioning_scale, lora_scale; and the sampling options (mode, parallel, drafts,
subintervals, preconditioning, window, tolerance). `model` is what the request is checked against: a ModelRef
(model_ref.py: configs read before any weights load) or a loaded service, each with a `kind` (digits, gmm, fixed
or pipeline) and, for pipelines, its `PipelineRules`. A Request crosses to the other ranks as bytes
(`to_wire` / `from_wire`), decoded there without any check.
"""
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType

import PIL.Image

from . import digits, schedulers
from .options import ITERATIVE_KEYS, SamplingOptions
from .pipelines import DEFAULT_GUIDANCE, DEFAULT_STEPS, REGISTRY, SCHEDULERS, family_names
from .pipelines.conditioning import per_net
from .pipelines.tasks import families_with, family_default_strength, require
from .strength import check_strength, kept_steps

MODEL_KEYS = ("prompt", "negative_prompt", "steps", "guidance_scale", "height", "width", "seed", "num_images",
              "scheduler", "num_frames", "fps",  # num_frames, fps: video pipelines only
              "image", "mask_image", "control_image", "strength", "controlnet_conditioning_scale", "lora_scale")
IMAGE_KEYS = ("image", "mask_image", "control_image")  # PNG / JPEG (control_image: one, or one per net)
CONDITIONING_KEYS = IMAGE_KEYS + ("strength", "controlnet_conditioning_scale", "lora_scale")  # image pipelines only
SAMPLING_KEYS = ("mode", "parallel", "drafts") + ITERATIVE_KEYS
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_FPS = 240
JSON_BYTES = 1 << 16  # a request's JSON besides its images


class RequestError(ValueError):
    """A request that cannot be served as given; the message names the bad value and what is allowed."""


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


def request_bytes(limits: Limits) -> int:
    """The largest encoded request the engine and the server accept: the JSON fields plus the images as base64."""
    return JSON_BYTES + (0 if not limits.image_bytes else -(-limits.image_bytes // 3) * 4)


@dataclass(frozen=True)
class PipelineRules:
    """What a request is checked against for a pipeline, from its configs (no weights needed) or once loaded."""
    family: str
    multiple: int | None     # height and width must be multiples of this (None: checked once loaded)
    why: str                 # ... for this reason
    default_size: tuple | None  # (height, width) when a request names none (None: known once loaded)
    scheduler: str           # the scheduler used when a request names none
    video: bool = False      # a video family: num_frames (its rule checked once loaded) and fps
    task: str = "text2img"   # the pipeline's task by its class (conditioning.TASKS); controlnet with ControlNets
    nets: int = 0            # ControlNets: control images per request
    vae_scale: int | None = None  # sizes taken from an input image round down to multiples of this


def scheduler_name(scheduler) -> str:
    """The short name of a scheduler instance (driffusion_rt.schedulers), else its class name."""
    return schedulers.name_of(scheduler) or type(scheduler).__name__


@dataclass(frozen=True, eq=False)
class Request:
    """A validated request: every field's resolved value (defaults filled in, input images named by format, size
    and digest: what a run records and names its outputs by), the sampling options, and the decoded input images
    with the bytes they came from. Immutable: a later stage that learns more makes a new one (`resolve`)."""
    kind: str                   # digits, gmm, fixed or pipeline
    resolved: MappingProxyType
    options: SamplingOptions
    given: frozenset = frozenset()  # the fields the client gave (the others are defaults)
    rules: PipelineRules | None = None  # what a pipeline request was checked against
    images: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # field -> PIL image (a list
    files: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))   # for control_image) -> its bytes

    def __getitem__(self, key):
        return self.resolved[key]

    def resolve(self, **values) -> "Request":
        """The same request with more values resolved (what the loaded model fills in)."""
        return dataclasses.replace(self, resolved=MappingProxyType({**self.resolved, **values}))

    def to_wire(self) -> bytes:
        """The request as bytes for the other ranks (JSON; image files as base64)."""
        files = {k: [base64.b64encode(b).decode() for b in v] if isinstance(v, list) else base64.b64encode(v).decode()
                 for k, v in self.files.items()}
        return json.dumps({"kind": self.kind, "resolved": dict(self.resolved), "options": self.options.fields(),
                           "given": sorted(self.given), "files": files,
                           "rules": None if self.rules is None else dataclasses.asdict(self.rules)},
                          sort_keys=True).encode()

    @classmethod
    def from_wire(cls, data: bytes) -> "Request":
        """A request rank 0 validated, from its bytes (no check is repeated: the images are only decoded)."""
        msg = json.loads(data)
        files = {k: [base64.b64decode(s) for s in v] if isinstance(v, list) else base64.b64decode(v)
                 for k, v in msg["files"].items()}
        images = {k: [_pil(b) for b in v] if isinstance(v, list) else _pil(v) for k, v in files.items()}
        rules = msg["rules"]
        if rules is not None:
            rules = PipelineRules(**{k: tuple(v) if isinstance(v, list) else v for k, v in rules.items()})
        return cls(msg["kind"], MappingProxyType(msg["resolved"]), SamplingOptions(**msg["options"]),
                   frozenset(msg["given"]), rules, MappingProxyType(images), MappingProxyType(files))


def _pil(raw: bytes):
    with PIL.Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------- fields


def _int(spec, key, lo, hi=None, default=None):
    v = spec.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise RequestError(f"{key} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise RequestError(f"{key}={v} is out of range: allowed {lo}..{hi if hi is not None else 'any'}")
    return v


def _common(spec, limits: Limits, default_steps: int, video: bool = False) -> dict:
    if not video:
        for key in ("num_frames", "fps"):
            if spec.get(key) is not None:
                raise RequestError(f"{key} applies to video pipelines ({family_names(video=True)}); this model makes "
                                   f"images")
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


def _not_for(spec, keys, model: str, why: str):
    for key in keys:
        if spec.get(key) is not None:
            raise RequestError(f"{key} does not apply to the {model} model ({why})")


def _image_bytes(value, key: str) -> bytes:
    """An image field's file bytes: given as bytes (the command line reads its files), or as a base64 string,
    optionally a data: URL (JSON)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a base64-encoded PNG or JPEG string, got {type(value).__name__}")
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{key} is not valid base64: {e}") from None


def _decode_image(value, key: str, limits: Limits, budget: list) -> tuple:
    """(PIL image in RGB, the image as the resolved values name it: format, size, digest, the file's bytes), with
    the limits checked from the header before the pixels are decoded. budget: [bytes left] of the request."""
    raw = _image_bytes(value, key)
    if budget[0] is not None:
        budget[0] -= len(raw)
        if budget[0] < 0:
            raise RequestError(f"the request's images are over {limits.image_bytes} bytes")
    try:
        im = PIL.Image.open(io.BytesIO(raw))
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise RequestError(f"{key} cannot be read as an image: {type(e).__name__}: {e}") from None
    if im.format not in IMAGE_FORMATS:
        raise RequestError(f"{key} is a {im.format} image; allowed: {', '.join(IMAGE_FORMATS)}")
    if limits.side is not None and max(im.size) > limits.side:
        raise RequestError(f"{key} is {im.size[0]}x{im.size[1]} pixels; the limit is {limits.side} per side")
    try:  # the header is read: decode the pixels only now that the size is known to be in bounds
        im.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise RequestError(f"{key} cannot be read as an image: {type(e).__name__}: {e}") from None
    info = {"format": im.format, "height": im.height, "width": im.width,
            "sha256": hashlib.sha256(raw).hexdigest()[:16]}
    return im.convert("RGB"), info, raw


# ---------------------------------------------------------------------------------------------- per model


def _digits(spec: dict, limits: Limits) -> dict:
    r = _common(spec, limits, 50)
    _not_for(spec, ("height", "width", "negative_prompt"), "digits",
             f"it draws {digits.RESOLUTION}x{digits.RESOLUTION} digits")
    _not_for(spec, CONDITIONING_KEYS, "digits", "image inputs and LoRA scales apply to diffusers pipelines")
    name = spec.get("scheduler") or "ddim"
    if name not in digits.SCHEDULER_NAMES:
        raise RequestError(f"scheduler {name!r} is not available for the digits model; choose one of "
                           f"{', '.join(digits.SCHEDULER_NAMES)}")
    prompt = "0123456789" if r["prompt"] is None else r["prompt"]
    try:
        labels = digits.parse_prompt(prompt)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if limits.images is not None and len(labels) > limits.images:
        raise RequestError(f"the prompt asks for {len(labels)} digits; the limit is {limits.images} per image")
    g = digits.DEFAULT_GUIDANCE if r["guidance_scale"] is None else float(r["guidance_scale"])
    return dict(r, prompt=prompt, labels=labels.tolist(), num_images=r["num_images"] or 1, guidance_scale=g,
                scheduler=name, height=None, width=None, negative_prompt=None)


def _toy(name: str, spec: dict, limits: Limits) -> dict:
    r = _common(spec, limits, 50)
    _not_for(spec, ("prompt", "negative_prompt", "height", "width", "guidance_scale") + CONDITIONING_KEYS, name,
             "it has no conditioning and no image size")
    sched = spec.get("scheduler") or "ddim"
    if sched not in schedulers.TOY:
        raise RequestError(f"scheduler {sched!r} is not one of {', '.join(schedulers.TOY)}")
    return dict(r, num_images=r["num_images"] or 4, scheduler=sched, height=None, width=None, negative_prompt=None)


def _pipeline(spec: dict, rules: PipelineRules, limits: Limits) -> tuple:
    """(resolved values, decoded images, their files) of a text-to-image (or text-to-video) request for a pipeline.
    Video requests get num_frames and fps checked in range here; a video family's frame rule, default fps and
    guidance need the loaded pipeline (services.VideoService.admit)."""
    r = _common(spec, limits, DEFAULT_STEPS[rules.family], video=rules.video)
    prompt = r["prompt"]
    if not prompt or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty string for the {rules.family} pipeline")
    neg = spec.get("negative_prompt")
    if neg is not None and (not isinstance(neg, str) or (limits.prompt_chars and len(neg) > limits.prompt_chars)):
        raise RequestError(f"negative_prompt must be a string of at most {limits.prompt_chars} characters")
    name = spec.get("scheduler")
    if name is not None and name not in SCHEDULERS[rules.family]:
        raise RequestError(f"scheduler {name!r} is not supported for {rules.family} pipelines; choose one of "
                           f"{', '.join(SCHEDULERS[rules.family])}")
    given = [_int(spec, key, 1, limits.side) for key in ("height", "width")]
    cond, images, files = _conditioning(spec, rules, limits, r["steps"])
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
    g = r["guidance_scale"]
    if not rules.video:  # (a video pipeline's default guidance can be its own component's: resolved once loaded)
        g = DEFAULT_GUIDANCE[rules.family] if g is None else float(g)
    r = dict(r, negative_prompt=neg, num_images=r["num_images"] or 1, guidance_scale=g,
             scheduler=name or rules.scheduler, height=size[0], width=size[1], **cond)
    if rules.video:
        r.update(num_frames=_int(spec, "num_frames", 1, limits.frames), fps=_int(spec, "fps", 1, MAX_FPS))
    return r, images, files


def _size_from_image(cond: dict, images: dict, rules: PipelineRules) -> tuple:
    """(height, width) a request without a size takes from its input image, as the pipelines do (ControlNet: the
    control image; SD / SDXL / Z-Image img2img: the init image; rounded down to the VAE's factor; an edit: the size
    the family resizes the image to), else (None, None)."""
    im = None
    if cond.get("task") == "edit":
        return REGISTRY[rules.family].edit_size(images["image"].height, images["image"].width)
    if cond.get("task") == "controlnet":
        im = images["control_image"][0]
    elif cond.get("task") == "img2img" and getattr(REGISTRY[rules.family], "img2img_size_from_image", False):
        im = images["image"]
    if im is None or not rules.vae_scale:
        return None, None
    return tuple(v - v % rules.vae_scale for v in (im.height, im.width))


def _conditioning(spec: dict, rules: PipelineRules, limits: Limits, steps: int) -> tuple:
    """A request's image inputs and LoRA scale: which task they ask for and whether the pipeline has it, the
    images decoded (format, size, the request's image bytes), strength (default: the pipeline's) and whether it
    keeps a step, one control image and scale per ControlNet. Returns (resolved fields, {key: PIL image, or a
    list for control_image}, {key: the image files' bytes})."""
    given = [k for k in CONDITIONING_KEYS if spec.get(k) is not None]
    if rules.video:
        if given:
            raise RequestError(f"{given[0]} applies to image pipelines ({family_names(video=False)}); this model "
                               f"makes videos")
        return {}, {}, {}
    lora_scale = spec.get("lora_scale")
    if lora_scale is not None and (isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real)
                                   or not math.isfinite(lora_scale)):
        raise RequestError(f"lora_scale must be a finite number, got {lora_scale!r}")
    family = REGISTRY[rules.family]
    image, mask, control = (spec.get(k) for k in IMAGE_KEYS)
    strength, scale = spec.get("strength"), spec.get("controlnet_conditioning_scale")
    out = dict(task="text2img", image=None, mask_image=None, control_image=None, strength=None,
               controlnet_conditioning_scale=None, lora_scale=None if lora_scale is None else float(lora_scale))
    budget, images, files = [limits.image_bytes], {}, {}
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
            scales = per_net(1.0 if scale is None else scale, rules.nets, "controlnet_conditioning_scale")
        except ValueError as e:
            raise RequestError(str(e)) from None
        images["control_image"] = [im for im, _, _ in decoded]
        files["control_image"] = [raw for _, _, raw in decoded]
        out.update(task="controlnet", control_image=[info for _, info, _ in decoded],
                   controlnet_conditioning_scale=scales)
        return out, images, files
    if control is not None or scale is not None:
        raise RequestError("control_image needs a server started with --controlnet (ControlNet pipelines: "
                           f"{families_with('controlnet')})")
    if rules.task == "edit":  # the image to edit: required, no mask, no strength
        extra = [k for k, v in (("mask_image", mask), ("strength", strength)) if v is not None]
        if image is None or extra:
            raise RequestError(f"this {rules.family} pipeline edits an image: requests need image (the picture to "
                               f"edit){' and take no ' + ' or '.join(extra) if extra else ''}")
        images["image"], out["image"], files["image"] = _decode_image(image, "image", limits, budget)
        out.update(task="edit")
        return out, images, files
    if mask is not None and image is None:
        raise RequestError("mask_image needs image (the picture to inpaint)")
    if image is None:
        if strength is not None:
            raise RequestError("strength applies to requests with an image")
        if rules.task == "inpaint":
            raise RequestError(f"this {rules.family} pipeline is an inpainting pipeline: requests need image and "
                               f"mask_image")
        return out, images, files
    task = "img2img" if mask is None else "inpaint"
    try:
        require(family, task)
        strength = family_default_strength(family, task) if strength is None else check_strength(strength)
        kept_steps(steps, strength, family.strength_rule)
    except ValueError as e:
        raise RequestError(str(e)) from None
    images["image"], out["image"], files["image"] = _decode_image(image, "image", limits, budget)
    if mask is not None:
        images["mask_image"], out["mask_image"], files["mask_image"] = _decode_image(mask, "mask_image", limits,
                                                                                      budget)
    out.update(task=task, strength=strength)
    return out, images, files


def parse(spec, model, limits: Limits = NO_LIMITS) -> Request:
    """Validate a request for `model` (a ModelRef or a loaded service: `.kind`, and `.rules` for a pipeline) once:
    unknown fields, the sampling options, every model field against the model's rules. Raises RequestError naming
    the bad value and what is allowed."""
    if not isinstance(spec, dict):
        raise RequestError(f"a request must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(MODEL_KEYS) - set(SAMPLING_KEYS))
    if unknown:
        raise RequestError(f"unknown request field(s) {unknown}; allowed: {', '.join(MODEL_KEYS + SAMPLING_KEYS)} "
                           f"(and response, over HTTP)")
    try:
        options = SamplingOptions.parse(spec, limits.parallel, limits.steps)
    except ValueError as e:
        raise RequestError(str(e)) from None
    images = files = {}
    rules = getattr(model, "rules", None)
    if model.kind == "digits":
        resolved = _digits(spec, limits)
    elif model.kind in ("gmm", "fixed"):
        resolved = _toy(model.kind, spec, limits)
    else:
        resolved, images, files = _pipeline(spec, rules, limits)
    given = frozenset(k for k, v in spec.items() if v is not None and k in MODEL_KEYS)
    return Request(model.kind, MappingProxyType(resolved), options, given, rules, MappingProxyType(images),
                   MappingProxyType(files))
