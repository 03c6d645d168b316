"""Loaded models: a replica of the model each rank holds, and what it does with a validated request (requests.py).

    service = load_service("digits", device)         # digits, gmm, fixed, or a diffusers pipeline
    request = service.admit(parse(spec, service))    # the checks only the loaded model can make (rank 0)
    check_sequence(service, request, ulysses, ring)  # ... and the sequence split of the job's layout
    prepared = service.prepare(request)              # every rank: the sampler's inputs
    out = sampler.apply(prepared, request.options)   # layout.parallelize built the sampler
    images, stats = service.outputs(out, request, prepared)   # rank 0: PIL images (videos: lists of frames)

The command line (generate.py) and the engine (engine.py) share them, so the same request gives the same image
through both. A service's `kind` and `rules` are what requests.parse checks a request against.
"""
import torch
from PIL import Image

from . import digits, pipelines, schedulers
from .fixed_cost import FixedCostModel
from .gmm import GaussianMixture, GaussianMixtureModel
from .model_ref import BUILTIN, check_adapters
from .pipelines import conditioning as cond
from .pipelines import lora, tasks
from .requests import PipelineRules, Request, RequestError, scheduler_name
from .sampler import Prepared
from .trajectory import Trajectory


def _request_error(fn, *args, **kwargs):
    """fn(...), its ValueError as the request's error (bad input the loaded model found)."""
    try:
        return fn(*args, **kwargs)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(str(e)) from None


class DigitsService:
    """The class-conditional digits model shipped in the package: one PNG grid of the prompt's digits per image."""
    kind = name = "digits"
    rules = None
    video = False
    output = "images"  # what a request answers with: images, videos or latents

    def __init__(self, device, dtype=torch.float32, path=None):
        self.device, self.dtype, self.path = device, dtype, path
        self.unet, _ = digits.load_digits_model(path=path, device=device, dtype=dtype)
        self.model = digits.DigitsModel(self.unet)

    def admit(self, request: Request) -> Request:
        return request

    def prepare(self, request: Request) -> Prepared:
        r = request.resolved
        labels = torch.tensor(r["labels"]).repeat(r["num_images"])  # image i is rows i*k .. (i+1)*k - 1
        gen = torch.Generator().manual_seed(r["seed"])
        x = torch.randn(len(labels), 1, digits.RESOLUTION, digits.RESOLUTION, generator=gen)
        kw = {"labels": labels.to(self.device), "guidance_scale": r["guidance_scale"]}
        # the trajectory here, not in the sampler: a scheduler the runtime cannot run is the request's error
        traj = _request_error(Trajectory.from_scheduler, digits.load_scheduler(r["scheduler"], self.path), r["steps"])
        return Prepared(traj, x.to(self.device, self.dtype), kw, gen)

    def outputs(self, out, request: Request, prepared: Prepared) -> tuple:
        """(num_images PIL images, each the grid of the prompt's digits; {})."""
        images = digits.to_images(out.sample)
        k = len(request.resolved["labels"])
        return [Image.fromarray(digits.grid(images[i: i + k]), mode="L") for i in range(0, len(images), k)], {}


class _PerRequest:
    """A stable model object (samplers keep their model) delegating to the current request's model."""
    inner = None

    def __call__(self, x, t, **kwargs):
        return self.inner(x, t, **kwargs)


class ToyService:
    """gmm (the analytic Gaussian mixture, 4x16x16) or fixed (a model that sleeps `cost` seconds per call, plus
    `cost_per_row` per row of a call): latents, no images."""
    rules = None
    video = False
    output = "latents"

    def __init__(self, name: str, device, dtype=torch.float32, cost: float = 0.04, cost_per_row: float = 0.0):
        self.kind = self.name = name
        self.device, self.dtype = device, dtype
        self.mixture = GaussianMixture.random(8, shape=(4, 16, 16), seed=0)
        self.model = FixedCostModel(cost, cost_per_row) if name == "fixed" else _PerRequest()
        schedulers.toy("ddim")  # imports diffusers' schedulers now rather than in the first request

    def admit(self, request: Request) -> Request:
        return request

    def prepare(self, request: Request) -> Prepared:
        r = request.resolved
        traj = Trajectory.from_scheduler(schedulers.toy(r["scheduler"]), r["steps"])
        kw = None
        if self.name == "gmm":  # the trajectory is a model input: a graph captured for one request serves the next
            self.model.inner = GaussianMixtureModel(self.mixture, traj)
            kw = GaussianMixtureModel.table_kwargs(traj, self.device)
        gen = torch.Generator().manual_seed(r["seed"])
        x = torch.randn(r["num_images"], *self.mixture.shape, generator=gen).to(self.device, self.dtype)
        return Prepared(traj, x, kw, gen)

    def outputs(self, out, request: Request, prepared: Prepared) -> tuple:
        return [], {}


def rules_of_pipe(pipe) -> PipelineRules:
    """PipelineRules of a loaded pipeline (its family's own size rule, default size and scheduler)."""
    family = pipelines.get_family(pipe)
    mult, why = pipelines.size_multiple(pipe)
    task = "text2img" if family.video else tasks.task_of(pipe)
    return PipelineRules(family.name, int(mult), why, tuple(int(v) for v in pipelines.default_size(pipe)),
                         scheduler_name(pipe.scheduler), family.video, task, len(tasks.nets_of(pipe)),
                         None if family.video else int(pipe.image_processor.config.vae_scale_factor))


def _controlnets(paths, dtype, device):
    """ControlNetModel(s) from local directories (one: the model, several: a list for a MultiControlNet)."""
    from diffusers import ControlNetModel  # heavy: seconds to import
    nets = []
    for path in paths:
        try:
            nets.append(ControlNetModel.from_pretrained(path, torch_dtype=dtype).to(device))
        except (OSError, ValueError) as e:
            raise RequestError(f"--controlnet {path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    return nets[0] if len(nets) == 1 else nets


class PipelineService:
    """A diffusers image pipeline (SD 1.5 / 2.1, SDXL, SD3, Flux.1 / .2, Qwen-Image, Z-Image) loaded once:
    text-to-image, img2img and inpainting requests (image / mask_image), edits (image, Qwen-Image-Edit), with LoRA weights loaded at start (loras: "PATH[:SCALE]" or (path,
    scale)), or a ControlNet pipeline (controlnets: ControlNetModel directories, one per control image of a
    request). Adapters that cannot be loaded raise RequestError (bad input, found only once loading)."""
    kind = "pipeline"
    video = False
    output = "images"

    def __init__(self, pipe, name: str):
        self.pipe, self.name = pipe, name
        self.family = pipelines.get_family(pipe)
        self.device = pipe._execution_device
        self.rules = rules_of_pipe(pipe)
        self.model = pipelines.model_adapter(pipe)

    def _inputs(self, request: Request):
        """The image task's inputs of a checked request (no check repeated), or None for text-to-image."""
        r, images = request.resolved, request.images
        if r["task"] == "controlnet":
            controls = images["control_image"]
            nets = len(tasks.nets_of(self.pipe))
            return cond.Control(controls, list(r["controlnet_conditioning_scale"]), False, [0.0] * nets, [1.0] * nets)
        if r["task"] == "inpaint":
            return cond.Inpaint(images["image"], images["mask_image"], r["strength"])
        if r["task"] == "img2img":
            return cond.Img2Img(images["image"], r["strength"])
        if r["task"] == "edit":
            return cond.Edit(images["image"])
        return None

    def admit(self, request: Request) -> Request:
        """What needs the loaded pipeline: whether it can run the image task (its UNet), the output size the task's
        images give and fit (control images of the output's size)."""
        inputs = self._inputs(request)
        if inputs is None:
            return request
        r = request.resolved
        _request_error(tasks.require, self.family, inputs.task, self.pipe)
        h, w = _request_error(inputs.fit, self.pipe, self.family, height=r["height"], width=r["width"],
                              batch=r["num_images"], num_images=r["num_images"])
        return request.resolve(height=h, width=w)

    def _scheduler(self, request: Request):
        """(scheduler instance, the short name asked for or None: the pipeline's own)."""
        name = request.resolved["scheduler"] if "scheduler" in request.given else None
        return pipelines.make_scheduler(self.pipe, name), name

    def prepare(self, request: Request) -> pipelines.PreparedImage:
        r = request.resolved
        sched, name = self._scheduler(request)
        options = {"clip_skip": None, "guidance_rescale": 0.0, "true_cfg_scale": 1.0, "max_sequence_length": None,
                   "lora_scale": r["lora_scale"]}
        args = pipelines.ImageArgs(self.family, r["prompt"], r["negative_prompt"], r["steps"], r["guidance_scale"],
                                   r["height"], r["width"], r["num_images"], sched, name,
                                   torch.Generator().manual_seed(r["seed"]), pipelines.step_options(sched, 0.0),
                                   {k: options[k] for k in self.family.options}, self._inputs(request))
        return _request_error(pipelines.encode, self.pipe, args)

    def outputs(self, out, request: Request, prepared) -> tuple:
        images = pipelines.decode(self.pipe, out.sample, height=prepared.height, width=prepared.width,
                                  output_type="pil").images
        return images, {}


class VideoService(PipelineService):
    """A loaded video pipeline (Wan, HunyuanVideo 1.5, LTX) serving requests with num_frames and fps (1..240,
    default the family's); its outputs are videos (lists of PIL frames, decoded on rank 0 only) and the decode's
    seconds and peak memory."""
    video = True
    output = "videos"

    def admit(self, request: Request) -> Request:
        """The family's frame rule and default fps and guidance, and the size rule when the request was checked
        before the pipeline was loaded (a video family's rules come with the loaded pipeline)."""
        r, pipe = request.resolved, self.pipe
        h, w = r["height"], r["width"]
        if request.rules is None or request.rules.multiple is None:
            h, w = _request_error(pipelines.check_size, pipe, h, w)
        frames = _request_error(pipelines.check_frames, pipe, r["num_frames"])
        _request_error(self.family.check_options, pipe, pipelines.family_options(self.family, {}))
        guidance = self.family.guidance(pipe, r["guidance_scale"])
        return request.resolve(height=h, width=w, num_frames=frames, fps=r["fps"] or pipelines.default_fps(pipe),
                               guidance_scale=guidance)

    def prepare(self, request: Request) -> pipelines.PreparedVideo:
        r = request.resolved
        sched, name = self._scheduler(request)
        options = pipelines.family_options(self.family, {})
        args = pipelines.VideoArgs(self.family, r["prompt"], r["negative_prompt"], r["steps"], r["guidance_scale"],
                                   r["height"], r["width"], r["num_frames"], r["num_images"], sched, name,
                                   torch.Generator().manual_seed(r["seed"]), options)
        return _request_error(pipelines.encode_video, self.pipe, args)

    def outputs(self, out, request: Request, prepared) -> tuple:
        """(the request's videos, each a list of PIL frames; the decode's stats)."""
        result, d = pipelines.decode_video(self.pipe, prepared, out.sample, output_type="pil")
        r = request.resolved
        return result.frames, dict(num_frames=r["num_frames"], fps=r["fps"], decode_s=d.seconds,
                                   decode_peak_bytes=d.peak_bytes, decode_memory=d.measure, vae_tiling=d.tiling,
                                   vae_slicing=d.slicing)


def check_sequence(service, request: Request, ulysses: int, ring: int):
    """Whether the job's sequence groups (ulysses x ring ranks) can split an admitted request's calls on the loaded
    model: the family's rule (pipelines.family.check_sequence) on the loaded components' configs. Raises
    RequestError naming the rule."""
    if ulysses * ring == 1:
        return
    if not isinstance(service, PipelineService):
        raise RequestError(f"--ulysses / --ring split a diffusers transformer's tokens; the {service.name} model has "
                           f"none")
    _request_error(pipelines.check_sequence, service.family, pipelines.component_configs(service.pipe),
                   request.resolved, ulysses, ring)


def load_pipeline_service(model: str, device, dtype=torch.float32, loras=(), controlnets=()) -> PipelineService:
    """A diffusers pipeline directory or hub id, with LoRA weights and ControlNets; the video service for a video
    family."""
    loras, controlnets = check_adapters(loras, controlnets)  # a missing file fails before the model loads
    pipe = pipelines.load_pipeline(model, dtype=dtype, device=device)
    try:
        if controlnets:
            pipe = tasks.for_task(pipe, "controlnet", controlnet=_controlnets(controlnets, dtype, device))
        lora.load_loras(pipe, loras)
    except ValueError as e:
        raise RequestError(str(e)) from None
    name = model.rstrip("/").split("/")[-1] or model
    return (VideoService if pipelines.get_family(pipe).video else PipelineService)(pipe, name)


def load_service(model: str, device, dtype=torch.float32, cost: float = 0.04, loras=(), controlnets=(),
                 cost_per_row: float = 0.0):
    """digits, gmm, fixed (cost + cost_per_row seconds per call), or a diffusers pipeline directory / hub id (with
    LoRA weights and ControlNets)."""
    if model in BUILTIN and (loras or controlnets):
        raise RequestError(f"LoRA weights and ControlNets apply to diffusers pipelines, not --model {model}")
    if model == "digits":
        return DigitsService(device, dtype)
    if model in ("gmm", "fixed"):
        return ToyService(model, device, dtype, cost, cost_per_row)
    return load_pipeline_service(model, device, dtype, loras, controlnets)


__all__ = ["DigitsService", "ToyService", "PipelineService", "VideoService", "load_service", "rules_of_pipe",
           "check_sequence"]
