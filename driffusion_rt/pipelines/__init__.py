"""Diffusers pipelines through the runtime: SD 1.5 / 2.1, SDXL, SD3, Flux.1, Flux.2, Qwen-Image and Z-Image,
text-to-image and the image tasks (img2img, inpainting, ControlNet, Qwen-Image-Edit's editing: conditioning.py) with
LoRA weights (lora.py); and text-to-video: Wan 2.1 / 2.2 (and Wan image-to-video), HunyuanVideo 1.5 and LTX-Video
(video.py, `text_to_video`).

A request goes: check every argument (prepare.check) -> encode the prompt once (the pipeline's own encode_prompt)
-> draw the initial noise exactly as the pipeline's prepare_latents draws it (same generator calls, shape and
dtype, but as unit noise: the sampler applies init_noise_sigma) -> `Sampler.apply` with a model adapter -> VAE
decode (rank 0 only under torchrun).

The adapters turn a pipeline's denoiser into the runtime's model call `model(x_in, t, **model_kwargs)`: x_in is
[rows, ...] with rows = drafts x batch (already through scale_model_input), t one timestep per row. Classifier-free
guidance happens inside the call (uncond and cond batched as one denoiser call, like the pipelines do); per-request
tensors sit in model_kwargs with first dim == the latent batch B so the runtime repeats them for the drafts of a
call, the negative and positive embeddings as separate entries so the repetition keeps them aligned. Tensors that
are per-shape constants (Flux's img_ids / txt_ids, whose first dim is a token count that may equal B by chance) are
wrapped in `Shared`, which the runtime never repeats.

With mode="sequential" the result equals the plain pipeline call with the same seed and scheduler (tests: max
relative error <= 1e-5 in float32). Not supported (raise or are simply not offered): callbacks
(callback_on_step_end), custom `timesteps` / `sigmas`, IP adapters, cross/joint attention kwargs other than the LoRA
scale, SDXL's denoising_start / denoising_end, SD3's skip-layer guidance, precomputed prompt embeddings. A pipeline
keeps its own scheduler (PNDM, DPM-Solver, UniPC, ...: every affine one runs); one the runtime cannot run is
replaced by the family's default with a warning, see `make_scheduler`.

Files: family.py (the Family contract and registry; docs/adding_a_family.md walks through it), loading.py,
prepare.py (check / encode / run), decode.py, guidance.py, images.py, tasks.py and conditioning.py (image tasks),
video.py, api.py (the functional forms), wrapper.py (DRiffusionPipeline), lora.py, and one module per family, each
registering itself when imported below (the order here is the order of error messages).
"""
from .family import (DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, FAMILIES, OPTIONS, REGISTRY, SCHEDULERS,
                     Family, check_sequence, component_configs, default_size, family_names, family_of, family_of_class,
                     get_family, model_adapter, output_class, register, size_multiple)
from .loading import DTYPE_ALIASES, HUB_ID, check_model_dir, load_pipeline, parse_dtype
from .guidance import guide
from .prepare import (ImageArgs, PreparedImage, check, check_size, encode, initial_noise, make_scheduler, prepare,
                      run, step_options)
from .decode import OUTPUT_TYPES, decode
# the family registry's import list: each module registers itself
from . import sd, sdxl, sd3, flux, flux2, qwen_image, qwen_image_edit, z_image  # noqa: E402,F401
from . import wan, hunyuan_video15, ltx  # noqa: E402,F401  video families (video.py: what they share)
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .hunyuan_video15 import HunyuanVideo15Adapter
from .ltx import LTXAdapter
from .qwen_image import QwenImageAdapter
from .sd import UNetAdapter
from .sd3 import SD3Adapter
from .video import (DecodeStats, PreparedVideo, VideoArgs, VideoFamily, VideoStats, check_frames, check_video,
                    decode_video, default_fps, encode_video, family_options, prepare_video)
from .wan import WanAdapter
from .z_image import ZImageAdapter
from .tasks import TASKS, for_task, task_of
from .conditioning import control, edit, from_call, img2img, inpainting, lora_scale_of
from .images import read_image
from .lora import load_loras
from .api import (control_to_image, edit_image, image_to_image, inpaint, text_to_image, text_to_video,
                  video_sampler)
from .wrapper import DRiffusionPipeline, DRiffusionVideoPipeline

__all__ = ["DRiffusionPipeline", "text_to_image", "prepare", "check", "encode", "run", "decode", "PreparedImage",
           "ImageArgs", "load_pipeline", "check_model_dir", "parse_dtype", "make_scheduler", "check_size",
           "size_multiple", "default_size", "family_of", "family_of_class", "family_names", "get_family",
           "model_adapter", "output_class", "Family", "register", "guide", "initial_noise", "UNetAdapter",
           "SD3Adapter", "FluxAdapter", "Flux2Adapter", "QwenImageAdapter", "ZImageAdapter", "REGISTRY", "FAMILIES",
           "SCHEDULERS", "text_to_video", "prepare_video",
           "check_video", "encode_video", "decode_video", "check_frames", "default_fps", "video_sampler",
           "DRiffusionVideoPipeline", "VideoFamily", "PreparedVideo", "VideoArgs", "VideoStats", "DecodeStats",
           "WanAdapter", "HunyuanVideo15Adapter", "LTXAdapter", "DEFAULT_SCHEDULER", "DEFAULT_GUIDANCE",
           "DEFAULT_STEPS", "OPTIONS", "OUTPUT_TYPES", "DTYPE_ALIASES", "HUB_ID", "TASKS", "task_of", "for_task",
           "image_to_image", "inpaint", "control_to_image", "edit_image", "img2img", "inpainting", "control", "edit",
           "from_call", "lora_scale_of", "read_image", "load_loras", "step_options", "family_options", "check_sequence",
           "component_configs"]
