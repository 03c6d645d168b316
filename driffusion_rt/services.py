"""Model services: a loaded model replica and how it turns a request (a plain JSON-able dict) into a sampler call
and the sampler's result into images. The one-shot CLI (generate.py) and the persistent engine (engine.py) share
them, so the same request gives the same image through both.

Request keys: prompt, negative_prompt, steps, guidance_scale, height, width, seed, num_images, scheduler; for
pipelines also image, mask_image, control_image (base64 PNG / JPEG), strength, controlnet_conditioning_scale and
lora_scale (sampling options such as mode and parallel are the caller's; see `sampling_options`).
"""
import base64
import binascii
import io
from dataclasses import dataclass

import torch

from .parasolver import MODES as ITERATIVE_MODES
from .plan import MODES
from .sampler import DRAFT_RULES

SCHEDULERS = ("ddim", "ddpm", "euler", "flow")
BUILTIN = ("digits", "gmm", "fixed")
MODEL_KEYS = ("prompt", "negative_prompt", "steps", "guidance_scale", "height", "width", "seed", "num_images",
              "scheduler", "num_frames", "fps", "image", "mask_image", "control_image", "strength",
              "controlnet_conditioning_scale", "lora_scale")  # num_frames, fps: video pipelines only (video_service.py)
IMAGE_KEYS = ("image", "mask_image", "control_image")  # base64 PNG / JPEG (control_image: one, or one per net)
IMAGE_FORMATS = ("PNG", "JPEG")
SAMPLING_KEYS = ("mode", "parallel", "drafts", "subintervals", "preconditioning", "window", "tolerance")


class RequestError(ValueError):
    """A request that cannot be served as given; the message names the bad value and what is allowed."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds a server enforces on every request (None: no bound)."""
    prompt_chars: int | None = 1000
    side: int | None = 2048        # height and width, pixels
    steps: int | None = 200
    images: int | None = 16        # images per request (num_images, or digits in a digits prompt)
    parallel: int | None = 64
    frames: int | None = 257       # frames per video (video pipelines)
    image_bytes: int | None = 8 << 20  # the request's images together, decoded


NO_LIMITS = Limits(None, None, None, None, None, None, None)
JSON_BYTES = 1 << 16  # a request's JSON besides its images


def request_bytes(limits: Limits) -> int:
    """The largest encoded request a server accepts: the JSON fields plus the images as base64."""
    return JSON_BYTES + (0 if not limits.image_bytes else -(-limits.image_bytes // 3) * 4)


@dataclass
class Request:
    """A validated request, ready for the sampler: scheduler (or trajectory), steps, unit noise, model kwargs."""
    spec: dict
    scheduler: object
    steps: int
    latent: torch.Tensor
    model_kwargs: dict | None = None
    generator: torch.Generator | None = None   # the stochastic steps' noise (matters on rank 0)
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
        raise RequestError(f"unknown request field(s) {unknown}; allowed: {', '.join(MODEL_KEYS + SAMPLING_KEYS)}")
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
        drafts = spec.get("drafts", "jump")
        if drafts not in DRAFT_RULES:
            raise RequestError(f"unknown drafts {drafts!r}; choose one of {', '.join(DRAFT_RULES)}")
        opts["drafts"] = drafts
    return opts


def _common(spec, limits: Limits, default_steps: int) -> tuple:
    for key in ("num_frames", "fps"):  # a video service checks these itself and passes the rest here
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
    return steps, seed, num, g


def _no_images(spec, name):
    given = [k for k in IMAGE_KEYS + ("strength", "controlnet_conditioning_scale", "lora_scale")
             if spec.get(k) is not None]
    if given:
        raise RequestError(f"{', '.join(given)} apply to diffusers pipelines, not the {name} model")


def decode_image(value, key: str, limits: Limits = NO_LIMITS, budget: list | None = None):
    """A request's image field (base64 of a PNG or JPEG file, optionally as a data: URL) as a PIL image, with
    the limits checked from the header before the pixels are decoded. budget: [bytes left] shared by the
    request's images."""
    from PIL import Image
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a base64-encoded PNG or JPEG string, got {type(value).__name__}")
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{key} is not valid base64: {e}") from None
    if budget is not None and budget[0] is not None:
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
    try:
        im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{key} cannot be read as an image: {type(e).__name__}: {e}") from None
    return im.convert("RGB")


def encode_image_file(path: str) -> str:
    """A file's bytes as the base64 string of a request's image field (the command line's --image and co.)."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


class DigitsService:
    """The class-conditional digits model shipped in the package (8x8 digits, one PNG grid per request)."""

    def __init__(self, device, dtype=torch.float32, path=None):
        from . import digits
        self.digits, self.device, self.dtype = digits, device, dtype
        self.name = "digits"
        self.unet, _ = digits.load_digits_model(path=path, device=device, dtype=dtype)
        self.path = path
        self.model = digits.DigitsModel(self.unet)

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> Request:
        d = self.digits
        _no_images(spec, "digits")
        steps, seed, num, g = _common(spec, limits, 50)
        for key in ("height", "width", "negative_prompt"):
            if spec.get(key) is not None:
                raise RequestError(f"{key} does not apply to the digits model (it draws {d.RESOLUTION}x{d.RESOLUTION} "
                                   f"digits)")
        name = spec.get("scheduler") or "ddim"
        if name not in d.SCHEDULERS:
            raise RequestError(f"scheduler {name!r} is not available for the digits model; choose one of "
                               f"{', '.join(d.SCHEDULERS)}")
        try:
            labels = d.parse_prompt("0123456789" if spec.get("prompt") is None else spec["prompt"])
        except ValueError as e:
            raise RequestError(str(e)) from None
        if num:
            labels = labels.repeat(-(-num // len(labels)))[:num]
        if limits.images is not None and len(labels) > limits.images:
            raise RequestError(f"the prompt asks for {len(labels)} digits; the limit is {limits.images} per request")
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(len(labels), 1, d.RESOLUTION, d.RESOLUTION, generator=gen).to(self.device, self.dtype)
        kw = {"labels": labels.to(self.device), "guidance_scale": d.DEFAULT_GUIDANCE if g is None else float(g)}
        return Request(spec, d.make_scheduler(name, self.path), steps, x, kw, gen)

    check = request  # validating is as cheap as building the request

    def images(self, out, req) -> list:
        """One PIL image: the grid of the request's digits."""
        from PIL import Image
        return [Image.fromarray(self.digits.grid(self.digits.to_images(out.sample)), mode="L")]


class PipelineService:
    """A diffusers pipeline (SD 1.5 / 2.1, SDXL, SD3, Flux) loaded once: text-to-image, img2img and inpainting
    requests (image / mask_image), with LoRA weights loaded at start (loras: "PATH[:SCALE]" or (path, scale)), or
    a ControlNet pipeline (controlnets: ControlNetModel directories, one per control image of a request)."""

    def __init__(self, model: str, device, dtype=torch.float32, loras=(), controlnets=()):
        from . import pipelines
        from .pipelines import conditioning, lora
        self.p, self.cond = pipelines, conditioning
        for spec in loras:  # a missing file fails before the model loads
            lora.check_lora_path(lora.parse_lora(spec)[0] if isinstance(spec, str) else spec[0])
        self.pipe = pipelines.load_pipeline(model, dtype=dtype, device=device)
        self.family = pipelines.family_of(self.pipe)
        if controlnets:
            self.pipe = conditioning.for_task(self.pipe, "controlnet", controlnet=_controlnets(controlnets, dtype,
                                                                                               device))
        lora.load_loras(self.pipe, loras)
        self.task = conditioning.task_of(self.pipe)
        self.name = model.rstrip("/").split("/")[-1] or model
        self.model = pipelines.model_adapter(self.pipe)

    def check(self, spec: dict, limits: Limits = NO_LIMITS) -> tuple:
        """Validate without encoding prompts or drawing noise (what an engine does before accepting a request):
        (steps, seed, num, guidance, prompt, negative, scheduler, height, width)."""
        return self._checked(spec, limits)[:9]

    def _checked(self, spec: dict, limits: Limits) -> tuple:
        """check's values, then the image inputs (conditioning object or None) and the LoRA scale."""
        p = self.p
        steps, seed, num, g = _common(spec, limits, p.DEFAULT_STEPS[self.family])
        prompt = spec.get("prompt")
        if not prompt or not prompt.strip():
            raise RequestError(f"prompt must be a non-empty string for the {self.family} pipeline")
        neg = spec.get("negative_prompt")
        if neg is not None and (not isinstance(neg, str) or (limits.prompt_chars and len(neg) > limits.prompt_chars)):
            raise RequestError(f"negative_prompt must be a string of at most {limits.prompt_chars} characters")
        name = spec.get("scheduler")
        if name is not None and name not in p.SCHEDULERS[self.family]:
            raise RequestError(f"scheduler {name!r} is not supported for {self.family} pipelines; choose one of "
                               f"{', '.join(p.SCHEDULERS[self.family])}")
        h, w = (_int(spec, k, 1, limits.side) for k in ("height", "width"))
        lora_scale = spec.get("lora_scale")
        if lora_scale is not None and (isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float))):
            raise RequestError(f"lora_scale must be a number, got {lora_scale!r}")
        try:
            inputs = self._inputs(spec, limits)
            if inputs is not None:  # the image's size is the default, and the checks that need the steps
                h, w = inputs.begin(self.pipe, p.get_family(self.pipe), height=h, width=w, steps=steps,
                                    batch=num or 1, num_images=num or 1, latents=None)
            h, w = p.check_size(self.pipe, h, w)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return steps, seed, num, g, prompt, neg, name, h, w, inputs, lora_scale

    def _inputs(self, spec: dict, limits: Limits):
        """The request's image inputs, checked (conditioning.Img2Img / Inpaint / Control), or None."""
        cond, budget = self.cond, [limits.image_bytes]
        image, mask, control = (spec.get(k) for k in IMAGE_KEYS)
        strength, scale = spec.get("strength"), spec.get("controlnet_conditioning_scale")
        if self.task == "controlnet":
            extra = [k for k, v in (("image", image), ("mask_image", mask), ("strength", strength)) if v is not None]
            if extra or control is None:
                raise RequestError(f"this server runs a ControlNet pipeline: requests take control_image (and "
                                   f"controlnet_conditioning_scale), not {', '.join(extra) or 'no image'}")
            images = [decode_image(c, f"control_image[{i}]", limits, budget) for i, c in enumerate(control)] \
                if isinstance(control, list) else decode_image(control, "control_image", limits, budget)
            return cond.control(self.pipe, images, 1.0 if scale is None else scale)
        if control is not None or scale is not None:
            raise RequestError("control_image needs a server started with --controlnet (ControlNet pipelines: "
                               "sd, sdxl)")
        if mask is not None and image is None:
            raise RequestError("mask_image needs image (the picture to inpaint)")
        if image is None:
            if strength is not None:
                raise RequestError("strength applies to requests with an image")
            return None
        image = decode_image(image, "image", limits, budget)
        if mask is not None:
            return cond.inpainting(self.pipe, image, decode_image(mask, "mask_image", limits, budget), strength)
        return cond.img2img(self.pipe, image, strength)

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> Request:
        steps, seed, num, g, prompt, neg, name, h, w, inputs, lora_scale = self._checked(spec, limits)
        r = self.p.prepare(self.pipe, prompt, negative_prompt=neg, steps=steps, guidance_scale=g, height=h, width=w,
                           num_images=num or 1, seed=seed, scheduler=name, conditioning=inputs,
                           lora_scale=lora_scale)
        spec = dict(spec, height=r.height, width=r.width)
        return Request(spec, r.trajectory, r.steps, r.latents, r.model_kwargs, r.generator, r.trajectory.start,
                       r.blend)

    def images(self, out, req) -> list:
        return self.p.decode(self.pipe, out.sample, height=req.spec["height"], width=req.spec["width"],
                             output_type="pil").images


class ToyService:
    """gmm (the analytic Gaussian mixture, 4x16x16) or fixed (a model that sleeps `cost` seconds per call)."""

    def __init__(self, name: str, device, dtype=torch.float32, cost: float = 0.04):
        from .fixed_cost import FixedCostModel
        from .gmm import GaussianMixture
        self.name, self.device, self.dtype = name, device, dtype
        self.mixture = GaussianMixture.random(8, shape=(4, 16, 16), seed=0)
        self.model = FixedCostModel(cost) if name == "fixed" else _PerRequest()

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> Request:
        from .gmm import GaussianMixtureModel
        from .trajectory import Trajectory
        _no_images(spec, self.name)
        steps, seed, num, _ = _common(spec, limits, 50)
        name = spec.get("scheduler") or "ddim"
        if name not in SCHEDULERS:
            raise RequestError(f"scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
        traj = Trajectory.from_scheduler(builtin_scheduler(name), steps)
        kw = None
        if self.name == "gmm":  # the trajectory is a model input: a graph captured for one request serves the next
            self.model.inner = GaussianMixtureModel(self.mixture, traj)
            kw = GaussianMixtureModel.table_kwargs(traj, self.device)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(num or 4, *self.mixture.shape, generator=gen).to(self.device, self.dtype)
        return Request(spec, traj, steps, x, kw, gen)

    check = request

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
    import os
    from diffusers import ControlNetModel
    nets = []
    for path in paths:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"ControlNet {path!r} is not a ControlNetModel directory (no config.json)")
        nets.append(ControlNetModel.from_pretrained(path, torch_dtype=dtype).to(device))
    return nets[0] if len(nets) == 1 else nets


def load_service(model: str, device, dtype=torch.float32, cost: float = 0.04, loras=(), controlnets=()):
    """digits, gmm, fixed, or a diffusers pipeline directory / hub id (with LoRA weights and ControlNets)."""
    if model in BUILTIN and (loras or controlnets):
        raise ValueError(f"LoRA weights and ControlNets apply to diffusers pipelines, not --model {model}")
    if model == "digits":
        return DigitsService(device, dtype)
    if model in ("gmm", "fixed"):
        return ToyService(model, device, dtype, cost)
    service = PipelineService(model, device, dtype, loras, controlnets)
    if getattr(service.p.get_family(service.pipe), "video", False):
        from .video_service import VideoService
        return VideoService(service)
    return service
