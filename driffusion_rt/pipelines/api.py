"""The functional forms: one call from a prompt (and the task's images) to decoded images or videos, through the
draft-and-refine runtime. Each returns (outputs, stats); under torchrun every rank calls it and only rank 0 decodes
(the other ranks get None).

    images, stats = text_to_image(pipe, "a red cat", mode="aggressive", parallel=4)
    images, stats = image_to_image(pipe, "a red cat", image, strength=0.6)
    images, stats = inpaint(pipe, "a red cat", image, mask_image)
    images, stats = control_to_image(cn_pipe, "a red cat", control_image)
    images, stats = edit_image(edit_pipe, "make the cat red", image)
    frames, stats = text_to_video(video_pipe, "a cat surfing", num_frames=81)
"""
import dataclasses

import torch

from ..distributed import is_root
from ..layout import parallelize
from ..results import SampleStats
from .conditioning import control, edit, img2img, inpainting
from .decode import check_output_type, decode
from .family import OPTIONS, model_adapter
from .prepare import prepare, run
from .video import IMAGE_ONLY, VIDEO_OPTIONS, VideoStats, decode_video, prepare_video


@torch.no_grad()
def text_to_image(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
                  num_images=1, seed=None, generator=None, scheduler=None, mode="aggressive", parallel=None,
                  output_type="pil", eta=0.0, guidance_rescale=0.0, true_cfg_scale=1.0, max_sequence_length=None,
                  clip_skip=None, latents=None, progress=False, sampler=None, lora_scale=None, conditioning=None,
                  ulysses=1, ring=1, **sample_kwargs) -> tuple:
    """Generate images from a prompt through the draft-and-refine runtime. Returns (images, stats).

    images: as the pipeline returns them for output_type ("pil": list of PIL images, "np": [N, H, W, 3] floats,
    "pt": [N, 3, H, W], "latent": the final latents). stats: the run's SampleStats. Under torchrun every rank
    calls this; only rank 0 decodes, the other ranks get images=None. mode="sequential" equals
    `pipe(prompt, ..., generator=torch.Generator().manual_seed(seed))` with the same scheduler. See
    `prepare.prepare` for the per-family meaning of guidance_scale / true_cfg_scale and for lora_scale /
    conditioning (image_to_image, inpaint and control_to_image pass it), `prepare.run` for sampler /
    sample_kwargs; progress shows a bar of rounds on rank 0. ulysses / ring (Flux under torchrun): sequence groups
    that split each transformer call's tokens (docs/layouts.md); each call without `sampler` builds the layout
    anew, so for many calls keep a sampler (layout.parallelize) or a DRiffusionPipeline."""
    check_output_type(output_type)
    req = prepare(pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                  height=height, width=width, num_images=num_images, generator=generator, seed=seed,
                  scheduler=scheduler, latents=latents, eta=eta, guidance_rescale=guidance_rescale,
                  true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length, clip_skip=clip_skip,
                  lora_scale=lora_scale, conditioning=conditioning)
    out = run(pipe, req, mode=mode, parallel=parallel, sampler=sampler, progress=progress, ulysses=ulysses,
              ring=ring, **sample_kwargs)
    images = None
    if is_root():
        images = decode(pipe, out.sample, height=req.height, width=req.width, output_type=output_type,
                        generator=req.decode_generator).images
    return images, out.stats


def image_to_image(pipe, prompt, image, *, strength=None, **kwargs) -> tuple:
    """img2img through the runtime (diffusers' Img2Img pipelines' semantics); returns (images, stats) like
    text_to_image, whose keyword arguments it takes. strength in (0, 1]: None is the pipeline's default."""
    return text_to_image(pipe, prompt, conditioning=img2img(pipe, image, strength), **kwargs)


def inpaint(pipe, prompt, image, mask_image, *, strength=None, **kwargs) -> tuple:
    """Inpainting through the runtime (diffusers' inpainting pipelines' semantics: a 9-channel inpainting UNet
    sees the mask and masked image, a 4-channel one is blended with the noised image after every state)."""
    return text_to_image(pipe, prompt, conditioning=inpainting(pipe, image, mask_image, strength), **kwargs)


def control_to_image(pipe, prompt, control_image, *, controlnet_conditioning_scale=1.0, guess_mode=False,
                     control_guidance_start=0.0, control_guidance_end=1.0, **kwargs) -> tuple:
    """ControlNet text-to-image through the runtime on a (Multi)ControlNet sd / sdxl pipeline."""
    inputs = control(pipe, control_image, controlnet_conditioning_scale, guess_mode, control_guidance_start,
                     control_guidance_end)
    return text_to_image(pipe, prompt, conditioning=inputs, **kwargs)


def edit_image(pipe, prompt, image, **kwargs) -> tuple:
    """Editing through the runtime on an editing pipeline (qwen-image-edit: the image is read with the prompt and
    conditions every call; the output size defaults to the image's, resized as the pipeline resizes it)."""
    return text_to_image(pipe, prompt, conditioning=edit(pipe, image), **kwargs)


def video_sampler(model, ulysses=1, ring=1):
    """A persistent Sampler for a video adapter (eager unless the adapter allows CUDA graphs), with sequence groups
    of ulysses x ring ranks under torchrun (Wan, LTX)."""
    return parallelize(model, ulysses=ulysses, ring=ring)


def video_stats(stats: SampleStats) -> VideoStats:
    """A run's SampleStats as VideoStats (the decode's stats are added on rank 0)."""
    return VideoStats(**{f.name: getattr(stats, f.name) for f in dataclasses.fields(SampleStats)})


_VIDEO_SPLIT = set(OPTIONS) | set(VIDEO_OPTIONS) | set(IMAGE_ONLY)


@torch.no_grad()
def text_to_video(pipe, prompt, *, negative_prompt=None, steps=None, guidance_scale=None, height=None, width=None,
                  num_frames=None, num_videos=1, seed=None, generator=None, scheduler=None, latents=None,
                  mode="aggressive", parallel=None, output_type="np", vae_tiling=True, progress=False, sampler=None,
                  ulysses=1, ring=1, **kwargs) -> tuple:
    """Generate videos from a prompt (Wan image-to-video: also image=) through the draft-and-refine runtime.
    Returns (frames, stats).

    frames: as the pipeline returns them for output_type ("np": [N, F, H, W, 3] floats in 0..1, "pt":
    [N, F, 3, H, W], "pil": a list of lists of PIL frames, "latent": the final latents); None on ranks other than
    0 under torchrun. stats: VideoStats (the run's SampleStats plus `.decode`: seconds and peak memory of the
    decode). kwargs: the family's options (see prepare_video), the rest are sampling options (e.g. drafts=).
    mode="sequential" equals `pipe(prompt, num_frames=..., generator=...)` with the same scheduler. sampler: a
    persistent Sampler (see video_sampler); None builds one for this call, with sequence groups of ulysses x ring
    ranks under torchrun (Wan, LTX; docs/layouts.md)."""
    check_output_type(output_type)
    options = {k: v for k, v in kwargs.items() if k in _VIDEO_SPLIT}
    sample_kwargs = {k: v for k, v in kwargs.items() if k not in _VIDEO_SPLIT}
    req = prepare_video(pipe, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                        height=height, width=width, num_frames=num_frames, num_videos=num_videos, generator=generator,
                        seed=seed, scheduler=scheduler, latents=latents, **options)
    sampler = sampler if sampler is not None else video_sampler(model_adapter(pipe), ulysses, ring)
    out = run(pipe, req, mode=mode, parallel=parallel, sampler=sampler, progress=progress, **sample_kwargs)
    stats = video_stats(out.stats)
    frames = None
    if is_root():
        result, stats.decode = decode_video(pipe, req, out.sample, output_type=output_type, vae_tiling=vae_tiling)
        frames = result.frames
    return frames, stats
