"""HunyuanVideo 1.5 (HunyuanVideo15Pipeline, text-to-video): HunyuanVideo15Transformer3DModel on [B, C, F, H, W]
latents, flow matching with the pipeline's linear sigmas, Qwen2.5-VL prompts plus ByT5 glyph embeddings (text in
quotes), classifier-free guidance configured by the pipeline's `guider` component.

The guider's scale, guidance_rescale and formulation are used as shipped (a guidance_scale given to the runtime
replaces the scale); a guider that guides only a fraction of the steps (start / stop) is refused with an error.
"""
import inspect
import math

import numpy as np
import torch

from .family import register
from .prepare import initial_noise
from .video import VideoFamily


class HunyuanVideo15Adapter:
    """HunyuanVideo15Transformer3DModel as a runtime model. The input gets the pipeline's all-zero text-to-video
    condition channels (latents and mask) and zero image embeddings (which the transformer masks out); uncond and
    cond run as one batched call (the guider makes two). model_kwargs: prompt_embeds, prompt_embeds_mask,
    prompt_embeds_2, prompt_embeds_mask_2, their negative_ versions (present iff guidance is on), image_embeds,
    guidance_scale, guidance_rescale, original_formulation."""
    cuda_graphs = False  # see video.py

    def __init__(self, transformer):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2,
                 image_embeds, negative_prompt_embeds=None, negative_prompt_embeds_mask=None,
                 negative_prompt_embeds_2=None, negative_prompt_embeds_mask_2=None, guidance_scale=1.0,
                 guidance_rescale=0.0, original_formulation=False):
        b, c, f, h, w = x.shape
        inp = torch.cat([x, x.new_zeros(b, c + 1, f, h, w)], dim=1)  # [latents, condition latents, mask]
        ts = t.to(inp.dtype)
        text = (prompt_embeds, prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2)
        cfg = negative_prompt_embeds is not None
        if cfg:
            neg = (negative_prompt_embeds, negative_prompt_embeds_mask, negative_prompt_embeds_2,
                   negative_prompt_embeds_mask_2)
            inp, ts, image_embeds = torch.cat([inp, inp]), torch.cat([ts, ts]), torch.cat([image_embeds] * 2)
            text = tuple(torch.cat([n, p]) for n, p in zip(neg, text))
        out = self.transformer(hidden_states=inp, image_embeds=image_embeds, timestep=ts,
                               encoder_hidden_states=text[0], encoder_attention_mask=text[1],
                               encoder_hidden_states_2=text[2], encoder_attention_mask_2=text[3],
                               return_dict=False)[0]
        if not cfg:
            pred = cond = out
        else:
            uncond, cond = out.chunk(2)  # the guider's arithmetic: base + scale * (cond - uncond)
            pred = (cond if original_formulation else uncond) + guidance_scale * (cond - uncond)
        if guidance_rescale > 0.0:
            from diffusers.guiders.guider_utils import rescale_noise_cfg  # heavy: diffusers takes seconds to import
            pred = rescale_noise_cfg(pred, cond, guidance_rescale)
        return pred


class HunyuanVideo15(VideoFamily):
    name = "hunyuan-video-1.5"
    pipeline_classes = ("HunyuanVideo15Pipeline",)
    schedulers = ("flow", "flow-unipc", "flow-dpm++2m")
    default_scheduler = "flow"
    default_steps = 50
    default_guidance = 6.0  # used only when the pipeline has no guider
    default_frames = 121

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.hunyuan_video1_5.pipeline_output import HunyuanVideo15PipelineOutput
        return HunyuanVideo15PipelineOutput

    def adapter(self, pipe):
        return HunyuanVideo15Adapter(pipe.transformer)

    def size_multiple(self, pipe):
        vsf, p = int(pipe.vae_scale_factor_spatial), int(pipe.transformer.config.patch_size)
        return vsf * p, f"VAE scale factor {vsf} x transformer patch size {p}"

    def default_size(self, pipe):
        h, w = pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0]
        return tuple(pipe.video_processor.calculate_default_height_width(h, w, pipe.target_size))

    def frame_rule(self, pipe):
        step = int(pipe.vae_scale_factor_temporal)
        return step, f"its VAE compresses time by {step} after the first frame"

    def guidance(self, pipe, guidance_scale):
        if guidance_scale is not None:
            return float(guidance_scale)
        guider = getattr(pipe, "guider", None)
        return float(guider.guidance_scale) if guider is not None else self.default_guidance

    def check_options(self, pipe, options):
        g = pipe.guider
        start, stop = g.config.get("start", 0.0), g.config.get("stop", 1.0)
        if (start, stop) != (0.0, 1.0):
            raise ValueError(f"the pipeline's guider guides only the steps from start={start} to stop={stop} (as "
                             f"fractions); the runtime applies guidance on every step: use a guider with start=0.0, "
                             f"stop=1.0")

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device):
        g = pipe.guider
        original = bool(g.use_original_formulation)
        # the guider's _is_cfg_enabled: enabled, and the scale not the identity of its formulation
        cfg = bool(g._enabled) and not math.isclose(guidance_scale, 0.0 if original else 1.0)
        n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        dtype = pipe.transformer.dtype
        common = dict(device=device, dtype=dtype, batch_size=n_prompts, num_videos_per_prompt=num_images)
        pos = pipe.encode_prompt(prompt=prompt, **common)
        kw = dict(prompt_embeds=pos[0], prompt_embeds_mask=pos[1], prompt_embeds_2=pos[2],
                  prompt_embeds_mask_2=pos[3], guidance_scale=guidance_scale,
                  guidance_rescale=float(g.guidance_rescale), original_formulation=original,
                  image_embeds=torch.zeros(batch, pipe.vision_num_semantic_tokens, pipe.vision_states_dim,
                                           dtype=dtype, device=device))
        if cfg:
            neg = pipe.encode_prompt(prompt=negative_prompt, **common)
            kw.update(negative_prompt_embeds=neg[0], negative_prompt_embeds_mask=neg[1],
                      negative_prompt_embeds_2=neg[2], negative_prompt_embeds_mask_2=neg[3])
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, num_frames, generator, latents, device, options):
        vsf, vst = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        shape = (batch, pipe.num_channels_latents, (num_frames - 1) // vst + 1, height // vsf, width // vsf)
        return initial_noise(shape, generator, device, pipe.transformer.dtype, latents), {}

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        """The pipeline's linear sigmas (1 .. 1/S), for schedulers that take custom sigmas."""
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            return None
        return {"sigmas": np.linspace(1.0, 0.0, steps + 1)[:-1]}

    def decode(self, pipe, latents, *, height, width, output_type, generator, options=None):
        vae = pipe.vae
        video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (pipe.video_processor.postprocess_video(video, output_type=output_type),)


register(HunyuanVideo15())
