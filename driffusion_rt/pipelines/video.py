"""Text-to-video (and Wan image-to-video): what every video family shares (api.text_to_video runs it).

A video request is an image request with a time axis: the families (wan.py, hunyuan_video15.py, ltx.py) return
5-D latents [B, C, F, H, W] (LTX: packed tokens) from prepare, frames from decode and an output class with
`.frames`. The runtime itself needs no change: drafts and refines are weighted sums over whatever latent shape
the family draws. What is new here is the frame-count rule (no silent rounding, unlike the pipelines), the video
options, and decoding: on rank 0 only, with the VAE's slicing (exact: one video at a time) and, unless turned off,
its tiling (a large frame is decoded in overlapping tiles; frames smaller than a tile are decoded whole, so
results are unchanged there), with the decode's time and peak memory measured (see `peak_memory`).

Video adapters run eagerly: each call of a video transformer takes long enough that CUDA-graph launch savings do
not matter, a captured graph would pin a large activation pool per row count, and Wan 2.2 picks its expert per row
from the timestep values (data-dependent control flow, which a graph cannot replay). Adapters say so with
`cuda_graphs = False`, which every Sampler honours (layout.parallelize, evaluator.ModelCall).
"""
import contextlib
import time
from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from ..results import SampleStats
from .decode import check_output_type, empty_fields, output_of
from .family import OPTIONS, REGISTRY, Family, get_family
from .prepare import (PreparedImage, check_size, choose_trajectory, common_args, make_scheduler, pipeline_prompts,
                      prompt_batch, run_generator)

# Options a video family may take (family.options names family.OPTIONS keys; family.video_options these) with their
# defaults: a value other than the default for a family that does not list it is an error naming what it takes.
VIDEO_OPTIONS = {"guidance_scale_2": None, "frame_rate": None, "decode_timestep": None, "decode_noise_scale": None,
                 "image": None, "last_image": None}
IMAGE_ONLY = {"clip_skip": None, "true_cfg_scale": 1.0, "eta": 0.0}  # image-pipeline options: never for video


class VideoFamily(Family):
    """A family whose pipelines make videos. Beyond `Family`: default_frames and the frame rule, default_fps (what
    an MP4 is written at), video_options (keys of VIDEO_OPTIONS it takes); encode / prepare / decode also receive
    the request's options, prepare the frame count."""
    video = True
    default_frames: int
    video_options: tuple = ()
    default_output_type = "np"  # what the pipeline's __call__ returns by default

    @abstractmethod
    def frame_rule(self, pipe) -> tuple:
        """(step, why): num_frames must be step * k + 1 (the VAE compresses time by `step` and keeps frame 0)."""

    def default_fps(self, pipe) -> int:
        return 24

    def guidance(self, pipe, guidance_scale):
        """The classifier-free guidance scale of a request (None: the pipeline's default)."""
        return self.default_guidance if guidance_scale is None else float(guidance_scale)

    def check_options(self, pipe, options: dict):
        """Reject option values this pipeline cannot honour (after the generic name check)."""

    @abstractmethod
    def prepare(self, pipe, model_kwargs, *, batch, height, width, num_frames, generator, latents, device,
                options) -> tuple:
        """(x, extra_kwargs): the initial noise drawn as the pipeline draws it, and geometry-dependent kwargs."""

    def final_latents(self, pipe, latents, model_kwargs):
        """The latents the pipeline decodes (or returns for output_type="latent") from the sampler's result."""
        return latents

    @abstractmethod
    def decode(self, pipe, latents, *, height, width, output_type, generator, options=None) -> tuple:
        """(frames,) for final latents: [B, F, H, W, 3] for "np", [B, F, 3, H, W] for "pt", lists of PIL frames."""


def video_pipelines() -> str:
    """The video families with their pipeline classes, for messages."""
    return ", ".join(f"{f.name} ({', '.join(f.pipeline_classes)})" for f in REGISTRY.values() if f.video)


def get_video_family(pipe) -> VideoFamily:
    family = get_family(pipe)
    if not family.video:
        raise ValueError(f"the {family.name} pipeline ({type(pipe).__name__}) makes images, not videos: use "
                         f"text_to_image; video pipelines: {video_pipelines()}")
    return family


def check_frames(pipe, num_frames) -> int:
    """Validate num_frames for this pipeline's VAE (None: the pipeline's default). No rounding: a count the VAE
    cannot take is an error naming the nearest ones it can."""
    family = get_video_family(pipe)
    n = family.default_frames if num_frames is None else num_frames
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames must be a positive integer number of frames, got {n!r}")
    step, why = family.frame_rule(pipe)
    if (n - 1) % step:
        lo = n - (n - 1) % step
        raise ValueError(f"num_frames={n} is not of the form {step}k+1, which the {family.name} pipeline needs "
                         f"({why}); use e.g. {lo} or {lo + step}")
    return n


def default_fps(pipe) -> int:
    return get_video_family(pipe).default_fps(pipe)


def family_options(family: VideoFamily, options: dict) -> dict:
    """The family's options, defaults filled in; a value for an option it does not take is an error."""
    allowed = tuple(family.options) + tuple(family.video_options)
    known = {**OPTIONS, **VIDEO_OPTIONS, **IMAGE_ONLY}
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown option {name!r} for the {family.name} pipeline; it takes: "
                            f"{', '.join(allowed) or 'none'}")
        if name not in allowed and value is not None and value != known[name]:
            raise ValueError(f"{name}={value!r} is not an option of the {family.name} pipeline; it takes: "
                             f"{', '.join(allowed) or 'none'}")
    return {name: options.get(name, known[name]) for name in allowed}


@dataclass(frozen=True, eq=False)
class VideoArgs:
    """The checked arguments of one video request (every check done): what `encode_video` prepares."""
    family: VideoFamily
    prompt: object
    negative_prompt: object
    steps: int
    guidance_scale: float
    height: int
    width: int
    num_frames: int
    num_videos: int                # per prompt
    scheduler: object
    scheduler_name: str | None
    generator: object = None
    options: dict = field(default_factory=dict)  # the family's options, defaults filled in
    latents: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return prompt_batch(self.prompt) * self.num_videos


@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedVideo(PreparedImage):
    """A prepared video request: a PreparedImage plus its frame count."""
    num_frames: int = 1


def check_video(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
                num_frames=None, num_videos=1, generator=None, seed=None, scheduler=None, latents=None,
                **options) -> VideoArgs:
    """Every check of `prepare_video`'s arguments, before the text encoders (see prepare_video)."""
    family = get_video_family(pipe)
    generator, steps = common_args(family, generator, seed, steps, num_videos=num_videos)
    options = family_options(family, options)
    family.check_options(pipe, options)
    guidance_scale = family.guidance(pipe, guidance_scale)
    height, width = check_size(pipe, height, width)
    num_frames = check_frames(pipe, num_frames)
    sched = make_scheduler(pipe, scheduler)
    prompt_batch(prompt)
    prompt, negative_prompt = pipeline_prompts(prompt, negative_prompt)
    return VideoArgs(family, prompt, negative_prompt, steps, guidance_scale, height, width, num_frames, num_videos,
                     sched, scheduler, generator, options, latents)


@torch.no_grad()
def encode_video(pipe, args: VideoArgs) -> PreparedVideo:
    """Encode the prompt, draw the initial noise as the video pipeline does and probe the trajectory."""
    family, device = args.family, pipe._execution_device
    kw = family.encode(pipe, args.prompt, args.negative_prompt, batch=args.batch, num_images=args.num_videos,
                       guidance_scale=args.guidance_scale, height=args.height, width=args.width, device=device,
                       **args.options)
    x, geometry = family.prepare(pipe, kw, batch=args.batch, height=args.height, width=args.width,
                                 num_frames=args.num_frames, generator=args.generator, latents=args.latents,
                                 device=device, options=args.options)
    kw.update(geometry)
    sched, traj = choose_trajectory(family, args.scheduler, args.scheduler_name, args.steps,
                                    family.timesteps_kwargs(pipe, args.scheduler, x, args.steps), {})
    return PreparedVideo(traj, x, kw, run_generator(args.generator, traj), family=family.name, height=args.height,
                         width=args.width, decode_generator=args.generator, num_frames=args.num_frames,
                         options=args.options)


def prepare_video(pipe, prompt, **kwargs) -> PreparedVideo:
    """Validate, encode the prompt and draw the initial noise the way the video pipeline's __call__ does.

    Keyword arguments: negative_prompt, steps, guidance_scale, height, width, num_frames, num_videos, generator /
    seed, scheduler, latents and the family's options. num_frames: the family's rule (Wan / HunyuanVideo 1.5: 4k+1,
    LTX 8k+1), no rounding. options: the family's (Wan: max_sequence_length, guidance_scale_2 for Wan 2.2's second
    expert, image / last_image for WanImageToVideoPipeline; LTX: max_sequence_length, guidance_rescale,
    frame_rate, decode_timestep, decode_noise_scale); an option of another family, or of image pipelines, is an
    error. Every check runs before the text encoders. generator / seed as in `prepare.prepare`."""
    return encode_video(pipe, check_video(pipe, prompt, **kwargs))


# ---------------------------------------------------------------------------------------------- decoding


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measure the peak memory a block adds; yields a dict that gets peak_bytes and measure.

    CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated after reset_peak_memory_stats) minus what
    was allocated before, measure "cuda-allocator". CPU (Linux): the process's peak resident set (VmHWM, reset by
    writing 5 to /proc/self/clear_refs) minus the resident set before, measure "cpu-rss": what the block made the
    process hold at its worst, tensors, buffers and allocator slack included. Elsewhere peak_bytes is None."""
    rec = {"peak_bytes": None, "measure": "unavailable"}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield rec
        torch.cuda.synchronize(device)
        rec.update(peak_bytes=int(torch.cuda.max_memory_allocated(device) - base), measure="cuda-allocator")
        return
    base = None
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        base = _status_kib("VmRSS")
    except OSError:
        pass
    yield rec
    peak = _status_kib("VmHWM") if base is not None else None
    if peak is not None:
        rec.update(peak_bytes=max(peak - base, 0) * 1024, measure="cpu-rss")


@dataclass
class DecodeStats:
    seconds: float
    peak_bytes: int | None      # memory the decode added at its peak (see peak_memory), None if not measurable
    measure: str                # "cuda-allocator", "cpu-rss" or "unavailable"
    tiling: bool                # the VAE decoded in spatial tiles (where frames exceed its tile size)
    slicing: bool               # the VAE decoded one video of the batch at a time


@dataclass
class VideoStats(SampleStats):
    """SampleStats of the sampling run plus the decode's (None on ranks other than 0 and for output_type latent)."""
    decode: DecodeStats | None = None


@contextlib.contextmanager
def _vae_mode(vae, tiling: bool):
    """Slicing on, tiling as asked, for the duration of one decode; the VAE's own settings are restored after."""
    saved = {k: getattr(vae, k) for k in ("use_slicing", "use_tiling") if hasattr(vae, k)}
    if "use_slicing" in saved:
        vae.use_slicing = True
    if "use_tiling" in saved:
        vae.use_tiling = bool(tiling)
    try:
        yield "use_slicing" in saved, bool(tiling) and "use_tiling" in saved
    finally:
        for k, v in saved.items():
            setattr(vae, k, v)


@torch.no_grad()
def decode_video(pipe, request: PreparedVideo, latents, *, output_type="np", vae_tiling=True,
                 return_dict=True) -> tuple:
    """Decode a request's final latents as the pipeline does after its loop: (output, DecodeStats).

    output: the pipeline's output class (`.frames`) or a tuple with return_dict=False; for output_type "latent" the
    latents the pipeline would return (Wan 2.2 TI2V image-to-video: with the image's frame put back). DecodeStats
    is None for "latent". Call it on one rank."""
    check_output_type(output_type)
    family = get_video_family(pipe)
    cls = family.output_class()
    latents = family.final_latents(pipe, latents, request.model_kwargs)
    stats = None
    if output_type == "latent":
        fields = (latents,) + empty_fields(cls)[1:]
    else:
        t0 = time.perf_counter()
        with _vae_mode(pipe.vae, vae_tiling) as (slicing, tiling), peak_memory(latents.device) as mem:
            fields = family.decode(pipe, latents, height=request.height, width=request.width,
                                   output_type=output_type, generator=request.decode_generator,
                                   options=request.options)
        stats = DecodeStats(time.perf_counter() - t0, mem["peak_bytes"], mem["measure"], tiling, slicing)
    pipe.maybe_free_model_hooks()
    return (output_of(cls, fields) if return_dict else fields), stats
