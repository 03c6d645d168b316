"""Text-to-image through the runtime: diffusers pipelines of the SD 1.5 / 2.1, SDXL, SD3 and Flux families; and
text-to-video: Wan 2.1 / 2.2 (and Wan image-to-video), HunyuanVideo 1.5 and LTX-Video (video.py, `text_to_video`).

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
SDXL's denoising_end, SD3's skip-layer guidance, precomputed prompt embeddings. A pipeline keeps its own scheduler
(PNDM, DPM-Solver, UniPC, ...: every affine one runs); one the runtime cannot run is replaced by the family's
default with a warning, see `make_scheduler`.

Layout: `core` holds what every family shares (loading, the registry, scheduler choice, prepare / run / decode,
text_to_image, DRiffusionPipeline); each family is one module defining a `core.Family` and registering it. A new
family is a new module plus its line in the import list below (the order there is the order of error messages).
"""
from .core import (DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, DTYPES, FAMILIES, OPTIONS, OUTPUT_TYPES,
                   REGISTRY, SCHEDULERS, DRiffusionPipeline, Family, Request, check_model_dir,
                   check_size, decode, default_size, draw_noise, family_of, family_of_class, get_family, guide,
                   load_pipeline, make_scheduler, model_adapter, output_class, parse_dtype, prepare, register, run,
                   size_multiple, text_to_image)
from . import sd, sdxl, sd3, flux  # noqa: E402,F401  the family registry's import list: each module registers itself
from . import wan, hunyuan_video15, ltx  # noqa: E402,F401  video families (video.py: what they share)
from .flux import FluxAdapter
from .hunyuan_video15 import HunyuanVideo15Adapter
from .ltx import LTXAdapter
from .sd import UNetAdapter
from .sd3 import SD3Adapter
from .video import (DRiffusionVideoPipeline, VideoFamily, VideoRequest, VideoStats, DecodeStats, check_frames,
                    decode_video, default_fps, prepare_video, text_to_video, video_sampler)
from .wan import WanAdapter

__all__ = ["DRiffusionPipeline", "text_to_image", "prepare", "run", "decode", "Request", "load_pipeline",
           "check_model_dir", "parse_dtype", "make_scheduler", "check_size", "size_multiple", "default_size",
           "family_of", "family_of_class", "get_family", "model_adapter", "output_class", "Family", "register",
           "guide", "draw_noise", "UNetAdapter", "SD3Adapter", "FluxAdapter", "REGISTRY", "FAMILIES", "SCHEDULERS",
           "text_to_video", "prepare_video", "decode_video", "check_frames", "default_fps", "video_sampler",
           "DRiffusionVideoPipeline", "VideoFamily", "VideoRequest", "VideoStats", "DecodeStats", "WanAdapter",
           "HunyuanVideo15Adapter", "LTXAdapter",
           "DEFAULT_SCHEDULER", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "OPTIONS", "OUTPUT_TYPES",
           "DTYPES"]
