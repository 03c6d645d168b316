"""Video pipelines behind the command line and the engine: requests with num_frames and fps, MP4 outputs.

`VideoService` wraps a loaded video pipeline's `services.PipelineService` (the image checks: prompt, steps,
guidance, scheduler, size) and adds the video fields: num_frames (the family's rule, no rounding, at most
Limits.frames) and fps (1..MAX_FPS, default the family's). Its outputs are videos (lists of PIL frames, decoded on
rank 0 only); the decode's seconds and peak memory land in the request's `output_stats`, which the CLI writes into
the run's JSON and the engine into its stats. MP4s are written with diffusers' export_to_video (imageio-ffmpeg,
H.264), atomically: a temporary file in the target folder renamed over the target once complete.
"""
import os
import tempfile
from dataclasses import dataclass, field

from . import services
from .outputs import _file_mode
from .services import NO_LIMITS, Limits, RequestError

VIDEO_KEYS = ("num_frames", "fps")
MAX_FPS = 240


def video_families() -> str:
    from .pipelines import REGISTRY
    return ", ".join(f.name for f in REGISTRY.values() if getattr(f, "video", False))


def check_kind(model: str, video_fields: list):
    """Before loading: video fields for a model that makes images are an error (built-in models, and pipeline
    directories by their model_index.json). Hub ids are checked once loaded."""
    if not video_fields:
        return
    what = None
    if model in services.BUILTIN:
        what = f"the built-in {model} model, which makes images"
    elif os.path.isdir(model):
        from . import pipelines
        cls = pipelines.check_model_dir(model).get("_class_name")
        family = pipelines.REGISTRY[pipelines.family_of_class(cls, where=model)]
        if not getattr(family, "video", False):
            what = f"a {cls} ({family.name}), which makes images"
    if what is not None:
        raise RequestError(f"{video_fields[0]} applies to video pipelines ({video_families()}); --model {model} is "
                           f"{what}")


@dataclass
class VideoServiceRequest(services.Request):
    video: object = None                               # the pipelines.VideoRequest, for the decode
    output_stats: dict = field(default_factory=dict)   # filled by VideoService.images (rank 0)


class VideoService:
    """A loaded video pipeline (Wan, HunyuanVideo 1.5, LTX) serving requests with num_frames and fps."""
    video = True

    def __init__(self, base):
        self.base, self.p, self.pipe = base, base.p, base.pipe
        self.family, self.name, self.model = base.family, base.name, base.model

    def check(self, spec: dict, limits: Limits = NO_LIMITS) -> dict:
        """The image checks (services.check_pipeline, num_frames and fps in range included), then the family's frame
        rule and default fps; returns every resolved value."""
        r = self.base.check(spec, limits)
        try:
            frames = self.p.check_frames(self.pipe, r["num_frames"])
        except ValueError as e:
            raise RequestError(str(e)) from None
        guidance = self.p.get_family(self.pipe).guidance(self.pipe, spec.get("guidance_scale"))
        return dict(r, num_frames=frames, fps=r["fps"] or self.p.default_fps(self.pipe), guidance_scale=guidance)

    def request(self, spec: dict, limits: Limits = NO_LIMITS) -> VideoServiceRequest:
        r = self.check(spec, limits)
        q = self.p.prepare_video(self.pipe, r["prompt"], negative_prompt=r["negative_prompt"], steps=r["steps"],
                                 guidance_scale=spec.get("guidance_scale"), height=r["height"], width=r["width"],
                                 num_frames=r["num_frames"], num_videos=r["num_images"], seed=r["seed"],
                                 scheduler=spec.get("scheduler"))
        spec = dict(spec, height=r["height"], width=r["width"], num_frames=r["num_frames"], fps=r["fps"])
        return VideoServiceRequest(spec, q.trajectory, q.steps, q.latents, q.model_kwargs, q.generator, r, video=q)

    def images(self, out, req) -> list:
        """The request's videos (each a list of PIL frames); records the decode's stats in req.output_stats."""
        result, d = self.p.decode_video(self.pipe, req.video, out.sample, output_type="pil")
        req.output_stats = dict(num_frames=req.spec["num_frames"], fps=req.spec["fps"], decode_s=d.seconds,
                                decode_peak_bytes=d.peak_bytes, decode_memory=d.measure, vae_tiling=d.tiling,
                                vae_slicing=d.slicing)
        return result.frames

    def save(self, out, req, out_dir: str, stem: str) -> list:
        """One MP4 per video: <stem>.mp4, or <stem>-<i>.mp4 for several."""
        videos = self.images(out, req)
        names = [f"{stem}.mp4"] if len(videos) == 1 else [f"{stem}-{i}.mp4" for i in range(len(videos))]
        return [write_mp4(v, os.path.join(out_dir, n), req.spec["fps"]) for n, v in zip(names, videos)]


def _export(frames, path: str, fps: int):
    from diffusers.utils import export_to_video
    # macro_block_size 2: H.264 needs even sides, which every family's size rule gives; the default 16 would let
    # ffmpeg rescale a frame whose side is not a multiple of 16
    export_to_video(frames, path, fps=fps, macro_block_size=2)


def write_mp4(frames, path: str, fps: int) -> str:
    """Write frames (PIL images or [H, W, 3] floats in 0..1) as an H.264 MP4 at `path`, atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".mp4")
    os.close(fd)
    try:
        _export(frames, tmp, fps)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def mp4_bytes(frames, fps: int) -> bytes:
    """The MP4 of frames, as bytes (an HTTP response body)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "video.mp4")
        _export(frames, path, fps)
        with open(path, "rb") as f:
            return f.read()
