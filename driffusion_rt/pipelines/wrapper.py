"""DRiffusionPipeline: an already loaded diffusers pipeline whose calls sample through the runtime, image or video."""
import torch

from ..distributed import is_root
from ..layout import parallelize, parse_cfg
from ..options import SamplingOptions
from ..results import SampleStats
from .api import video_stats
from .conditioning import from_call, lora_scale_of
from .decode import check_output_type, decode, empty_fields, output_of
from .family import OPTIONS, family_of, get_family, model_adapter, output_class
from .prepare import check_split, prepare
from .video import decode_video, get_video_family, prepare_video


class DRiffusionPipeline:
    """Wrap an already loaded diffusers pipeline so that calling it samples through the runtime.

        pipe = DRiffusionPipeline(StableDiffusionXLPipeline.from_pretrained(...).to("cuda"), mode="aggressive")
        image = pipe("a photo of a cat", num_inference_steps=30).images[0]
        pipe.last_stats  # SampleStats of the last call: serial_rounds, model_evals, wall_time, ideal_speedup, ...

    __call__ takes the wrapped pipeline's common arguments and returns what it returns (its own output class, or
    a tuple with return_dict=False). Arguments the runtime cannot honour (callbacks, custom timesteps, ...) are
    not accepted (TypeError). One persistent `Sampler` serves every call (buffers, CUDA graphs). Under torchrun
    every rank calls it; only rank 0 decodes (the other ranks get images=None). sample_kwargs: further sampling
    options (drafts=, the iterative modes' settings), checked here once. Other attributes are forwarded to the
    wrapped pipeline. A video pipeline gets the video wrapper (DRiffusionVideoPipeline: num_frames, `.frames`).

    Image pipelines take their own image arguments too: Img2Img pipelines `image` and `strength`, inpainting
    pipelines `image`, `mask_image` and `strength`, ControlNet pipelines `image` (the control image(s)),
    controlnet_conditioning_scale, guess_mode, control_guidance_start / end, QwenImageEditPipeline `image` (the
    picture to edit); the per-call LoRA scale is `cross_attention_kwargs={"scale": s}` (SD, SDXL),
    `joint_attention_kwargs={"scale": s}` (SD3, Flux, Z-Image) or `attention_kwargs={"scale": s}` (Qwen-Image,
    Flux.2). Guidance takes the pipeline's own names: Qwen-Image's is `true_cfg_scale` (default 4.0, on with a
    negative_prompt), its `guidance_scale` (a guidance embedding no checkpoint has) is ignored as the pipeline
    ignores it.
    cfg_parallel=2 (under torchrun, an even number of ranks): the uncond and cond halves of every guided call run
    on two ranks; ulysses=N / ring=M (Flux, Wan, LTX under torchrun): groups of N x M ranks split the tokens of
    every transformer call with diffusers' context parallelism; parallel then defaults to the draft ranks
    (world / (cfg x N x M)). See docs/layouts.md."""

    def __new__(cls, pipe, *args, **kwargs):
        if cls is DRiffusionPipeline and get_family(pipe).video:
            cls = DRiffusionVideoPipeline
        return super().__new__(cls)

    def __init__(self, pipe, mode="aggressive", parallel=None, scheduler=None, progress=False, cfg_parallel=1,
                 ulysses=1, ring=1, **sample_kwargs):
        family_of(pipe)
        self.pipe, self.scheduler, self.progress = pipe, scheduler, progress
        self.options = SamplingOptions(mode=mode, parallel=parallel, **sample_kwargs)
        self.cfg_parallel = int(parse_cfg(cfg_parallel))
        self.ulysses, self.ring = ulysses, ring
        self.last_stats: SampleStats | None = None
        self.model = model_adapter(pipe)
        self._sampler = None

    def __getattr__(self, name):
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def sampler(self):
        """Built on first use, so a process group initialised after wrapping is picked up. With cfg_parallel=2 or
        ulysses / ring the job's ranks form a (draft, cfg, ring, ulysses) layout: each guided denoiser call is
        split across a pair, each transformer call's tokens across a sequence group (driffusion_rt.layout); every
        rank must wrap the pipeline the same way."""
        if self._sampler is None:
            self._sampler = parallelize(self.model, self.pipe, cfg=self.cfg_parallel, ulysses=self.ulysses,
                                        ring=self.ring)
        return self._sampler

    def _empty(self, return_dict: bool):
        """What ranks other than 0 return (they do not decode)."""
        cls = output_class(self.pipe)
        return output_of(cls, empty_fields(cls)) if return_dict else empty_fields(cls)

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=None, guidance_scale=None, height=None,
                 width=None, num_images_per_prompt=1, generator=None, output_type="pil", return_dict=True, eta=0.0,
                 guidance_rescale=0.0, true_cfg_scale=None, max_sequence_length=None, clip_skip=None, latents=None,
                 image=None, strength=None, mask_image=None, controlnet_conditioning_scale=1.0, guess_mode=False,
                 control_guidance_start=0.0, control_guidance_end=1.0, cross_attention_kwargs=None,
                 joint_attention_kwargs=None, attention_kwargs=None):
        if prompt is None:
            raise ValueError("prompt is required (precomputed prompt embeddings are not supported)")
        check_output_type(output_type)
        inputs = from_call(self.pipe, image=image, strength=strength, mask_image=mask_image,
                           controlnet_conditioning_scale=controlnet_conditioning_scale, guess_mode=guess_mode,
                           control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end)
        lora_scale = lora_scale_of(self.pipe, cross_attention_kwargs, joint_attention_kwargs, attention_kwargs)
        if get_family(self.pipe).guidance_argument == "true_cfg_scale":  # the runtime's guidance_scale carries it
            guidance_scale, true_cfg_scale = true_cfg_scale, None
        true_cfg_scale = OPTIONS["true_cfg_scale"] if true_cfg_scale is None else true_cfg_scale
        req = prepare(self.pipe, prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=height, width=width, num_images=num_images_per_prompt,
                      generator=generator, scheduler=self.scheduler, latents=latents, eta=eta,
                      guidance_rescale=guidance_rescale, true_cfg_scale=true_cfg_scale,
                      max_sequence_length=max_sequence_length, clip_skip=clip_skip, lora_scale=lora_scale,
                      conditioning=inputs)
        check_split(self.pipe, req, self.sampler.layout)
        out = self.sampler.apply(req, self.options, progress=self.progress)
        self.last_stats = out.stats
        if not is_root():
            return self._empty(return_dict)
        return decode(self.pipe, out.sample, height=req.height, width=req.width, output_type=output_type,
                      generator=req.decode_generator, return_dict=return_dict)


class DRiffusionVideoPipeline(DRiffusionPipeline):
    """`DRiffusionPipeline` around a video pipeline (DRiffusionPipeline(pipe) returns one for a video family).

        pipe = DRiffusionPipeline(WanPipeline.from_pretrained(...).to("cuda"), mode="aggressive")
        frames = pipe("a cat surfing", num_frames=81, num_inference_steps=40).frames[0]
        pipe.last_stats.decode  # seconds and peak memory of the VAE decode

    __call__ takes the video pipeline's common arguments (num_frames, max_sequence_length, Wan 2.2's
    guidance_scale_2, Wan image-to-video's image / last_image, LTX's frame_rate / decode_timestep /
    decode_noise_scale / guidance_rescale) and returns its output class (`.frames`), or a tuple with
    return_dict=False; output_type defaults to the pipeline's ("np"; LTX "pil"). vae_tiling: decode in tiles
    where frames exceed the VAE's tile size (default on)."""

    def __init__(self, pipe, mode="aggressive", parallel=None, scheduler=None, progress=False, vae_tiling=True,
                 **sample_kwargs):
        get_video_family(pipe)
        super().__init__(pipe, mode=mode, parallel=parallel, scheduler=scheduler, progress=progress, **sample_kwargs)
        self.vae_tiling = vae_tiling

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height=None, width=None, num_frames=None,
                 num_inference_steps=None, guidance_scale=None, num_videos_per_prompt=1, generator=None, latents=None,
                 output_type=None, return_dict=True, max_sequence_length=None, **options):
        if prompt is None:
            raise ValueError("prompt is required (precomputed prompt embeddings are not supported)")
        output_type = get_video_family(self.pipe).default_output_type if output_type is None else output_type
        check_output_type(output_type)
        if max_sequence_length is not None:
            options["max_sequence_length"] = max_sequence_length
        req = prepare_video(self.pipe, prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=height, width=width, num_frames=num_frames,
                            num_videos=num_videos_per_prompt, generator=generator, scheduler=self.scheduler,
                            latents=latents, **options)
        check_split(self.pipe, req, self.sampler.layout)
        out = self.sampler.apply(req, self.options, progress=self.progress)
        stats = self.last_stats = video_stats(out.stats)
        if not is_root():
            return self._empty(return_dict)
        result, stats.decode = decode_video(self.pipe, req, out.sample, output_type=output_type,
                                            vae_tiling=self.vae_tiling, return_dict=return_dict)
        return result
