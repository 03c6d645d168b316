"""LTX-Video (LTXPipeline, text-to-video): LTXVideoTransformer3DModel on packed latent tokens [B, F H W, C], flow
matching with the pipeline's linear sigmas and dynamic shifting by the video's token count, T5 prompts.

Why LTX rather than CogVideoX as the third family: LTX is flow matching like Wan and HunyuanVideo 1.5, so all three
video families take the same flow schedulers (flow, flow-unipc, flow-dpm++2m) and its checkpoints ship a plain
FlowMatchEulerDiscreteScheduler the runtime runs as is; its pipeline already batches uncond and cond into one
transformer call; and it is the fast, small-GPU video model, where a parallel sampler's latency win is most
usable. CogVideoX 1.0's 5B checkpoints ship CogVideoXDPMScheduler, whose step() carries its own previous x0
estimate and timestep outside the scheduler's state (a second-order rule fed back through the pipeline loop),
its dynamic CFG varies the guidance with the step's cosine, and CogVideoX 1.5 pads the latent frames to the
temporal patch: each needs pipeline-specific plumbing without telling us more about the runtime.

Sequence parallelism: diffusers' plan for LTXVideoTransformer3DModel (0.42.1) also splits the prompt and its mask
along the text tokens, and LTX's attention turns the mask into one copy per head ([B, heads, 1, text]) before the
attention backend; Ulysses then hands each rank 1/ulysses of the heads while the mask keeps all of them, and the
cross-attention cannot be computed. The adapter's answer (`LTXAdapter.context_parallel`) is the one diffusers gives
Wan: the prompt stays whole on every rank and cross-attention runs locally, each rank's share of the video tokens
attending to the whole prompt (exact: the queries of a cross-attention are independent of each other); only the
self-attention over the video tokens is exchanged.
"""
import copy
import inspect

import numpy as np
import torch

from .family import denoiser_config, register
from .guidance import guide
from .prepare import initial_noise
from .video import VideoFamily


class LTXAdapter:
    """LTXVideoTransformer3DModel as a runtime model: packed tokens, the latent grid and RoPE interpolation scale
    (frame rate) of the request, classifier-free guidance inside with the pipeline's float32 guidance arithmetic
    and optional guidance_rescale. model_kwargs: prompt_embeds, prompt_attention_mask, negative_* (present iff
    guidance is on), guidance_scale, guidance_rescale, latent_frames, latent_height, latent_width,
    rope_interpolation_scale."""
    cuda_graphs = False  # see video.py
    TEXT = ("encoder_hidden_states", "encoder_attention_mask")  # what diffusers' plan splits and this one keeps whole

    def __init__(self, transformer):
        self.transformer = transformer

    def context_parallel(self, group):
        """diffusers' context parallelism over the sequence group with the prompt kept whole: diffusers' own plan
        without the text splits, and the cross-attention processors (attn2) without the parallel config, so they
        attend locally (see the module docstring)."""
        t = self.transformer
        plan = dict(t._cp_plan)
        plan[""] = {k: v for k, v in plan[""].items() if k not in self.TEXT}
        group.enable(t, cp_plan=plan)
        for block in t.transformer_blocks:
            local = copy.copy(block.attn2.processor)  # a processor of its own, whatever attn1 shares
            local._parallel_config = None
            block.attn2.set_processor(local)

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, prompt_attention_mask, latent_frames, latent_height, latent_width,
                 rope_interpolation_scale, negative_prompt_embeds=None, negative_prompt_attention_mask=None,
                 guidance_scale=1.0, guidance_rescale=0.0):
        cfg = negative_prompt_embeds is not None
        inp = x.to(prompt_embeds.dtype)
        if cfg:
            inp, t = torch.cat([inp, inp]), torch.cat([t, t])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
        out = self.transformer(hidden_states=inp, encoder_hidden_states=prompt_embeds, timestep=t,
                               encoder_attention_mask=prompt_attention_mask, num_frames=latent_frames,
                               height=latent_height, width=latent_width,
                               rope_interpolation_scale=rope_interpolation_scale, return_dict=False)[0].float()
        if not cfg:
            return out
        out, cond = guide(out, guidance_scale)
        if guidance_rescale > 0:
            # heavy: diffusers takes seconds to import
            from diffusers.pipelines.ltx.pipeline_ltx import rescale_noise_cfg
            out = rescale_noise_cfg(out, cond, guidance_rescale=guidance_rescale)
        return out


class LTX(VideoFamily):
    name = "ltx"
    pipeline_classes = ("LTXPipeline",)
    schedulers = ("flow", "flow-unipc", "flow-dpm++2m")
    default_scheduler = "flow"
    default_steps = 50
    default_guidance = 3.0
    default_frames = 161
    default_output_type = "pil"
    options = ("max_sequence_length", "guidance_rescale")
    video_options = ("frame_rate", "decode_timestep", "decode_noise_scale")
    sequence_parallel = True  # LTXVideoTransformer3DModel's _cp_plan, the prompt kept whole (LTXAdapter)

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.ltx.pipeline_output import LTXPipelineOutput
        return LTXPipelineOutput

    def adapter(self, pipe):
        return LTXAdapter(pipe.transformer)

    def size_multiple(self, pipe):
        vsf, p = int(pipe.vae_spatial_compression_ratio), int(pipe.transformer_spatial_patch_size)
        m = int(np.lcm(32, vsf * p))
        return m, f"multiples of 32 and of the VAE scale factor {vsf} x transformer patch size {p}"

    def sequence_tokens(self, configs, resolved):
        """The video tokens: latent frames x latent rows x latent columns, over the transformer's patches."""
        vae, den = configs.get("vae") or {}, denoiser_config(configs)
        # the VAE's compression as AutoencoderKLLTXVideo derives it from its config (its defaults where absent)
        scaling = 2 ** sum(vae.get("spatio_temporal_scaling") or (True, True, True, False))
        vsf = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * scaling
        vst = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * scaling
        p, pt = den.get("patch_size", 1), den.get("patch_size_t", 1)
        h, w, f = (resolved.get(k) for k in ("height", "width", "num_frames"))
        if not (h and w and f):
            return {}
        n = ((f - 1) // vst + 1) // pt * (h // vsf // p) * (w // vsf // p)
        return {f"video tokens (latent frames x height / {vsf * p} x width / {vsf * p})": n}

    def default_size(self, pipe):
        return 512, 704  # the pipeline's own defaults

    def frame_rule(self, pipe):
        step = int(pipe.vae_temporal_compression_ratio)
        return step, f"its VAE compresses time by {step} after the first frame"

    def default_fps(self, pipe):
        return 24

    def check_options(self, pipe, options):
        rate = options["frame_rate"]
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise ValueError(f"frame_rate must be a positive number of frames per second, got {rate!r}")

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               max_sequence_length, guidance_rescale, frame_rate, decode_timestep, decode_noise_scale):
        cfg = guidance_scale > 1
        seq = 128 if max_sequence_length is None else int(max_sequence_length)
        pos, pos_mask, neg, neg_mask = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
            num_videos_per_prompt=num_images, max_sequence_length=seq, device=device)
        kw = dict(prompt_embeds=pos, prompt_attention_mask=pos_mask, guidance_scale=guidance_scale,
                  guidance_rescale=float(guidance_rescale))
        if cfg:
            kw.update(negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask)
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, num_frames, generator, latents, device, options):
        """float32 noise [B, C, F', H', W'] packed into tokens [B, F' H' W' / patches, C x patches] as the pipeline
        packs it, and the latent grid and RoPE scale the transformer needs."""
        vsf, vst = int(pipe.vae_spatial_compression_ratio), int(pipe.vae_temporal_compression_ratio)
        p, pt = int(pipe.transformer_spatial_patch_size), int(pipe.transformer_temporal_patch_size)
        c = pipe.transformer.config.in_channels
        f, h, w = (num_frames - 1) // vst + 1, height // vsf, width // vsf
        if latents is None:
            x = pipe._pack_latents(initial_noise((batch, c, f, h, w), generator, device, torch.float32, None), p, pt)
        else:
            x = initial_noise((batch, (f // pt) * (h // p) * (w // p), c * pt * p * p), generator, device,
                           torch.float32, latents)
        rate = 25 if options["frame_rate"] is None else options["frame_rate"]
        return x, dict(latent_frames=f, latent_height=h, latent_width=w,
                       rope_interpolation_scale=(vst / rate, vsf, vsf))

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        """The pipeline's sigmas (1 .. 1/S) and the dynamic-shift mu of the video's token count, for the
        schedulers that take them (the pipeline passes both)."""
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift  # heavy: diffusers takes seconds to import
        c = scheduler.config
        p, pt = int(pipe.transformer_spatial_patch_size), int(pipe.transformer_temporal_patch_size)
        mu = calculate_shift(latents.shape[1] * pt * p * p, c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        accepts = inspect.signature(scheduler.set_timesteps).parameters
        kw = {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}
        return {k: v for k, v in kw.items() if k in accepts}

    def decode(self, pipe, latents, *, height, width, output_type, generator, options=None):
        """Unpack, denormalise and decode; a timestep-conditioned VAE gets the pipeline's decode noise, drawn from
        the request's generator after the initial noise (as the pipeline draws it)."""
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers takes seconds to import
        options = options or {}
        vae = pipe.vae
        vsf = int(pipe.vae_spatial_compression_ratio)
        p, pt = int(pipe.transformer_spatial_patch_size), int(pipe.transformer_temporal_patch_size)
        h, w = height // vsf, width // vsf
        f = latents.shape[1] * pt * p * p // (h * w)
        latents = pipe._unpack_latents(latents, f, h, w, p, pt)
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(pipe.text_encoder.dtype)  # the pipeline's prompt dtype, in which it draws the noise
        timestep = None
        if vae.config.timestep_conditioning:
            n = latents.shape[0]
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            dt = options.get("decode_timestep")
            dt = 0.0 if dt is None else dt
            dn = options.get("decode_noise_scale")
            dn = dt if dn is None else dn
            dt = dt if isinstance(dt, list) else [dt] * n
            dn = dn if isinstance(dn, list) else [dn] * n
            timestep = torch.tensor(dt, device=latents.device, dtype=latents.dtype)
            scale = torch.tensor(dn, device=latents.device, dtype=latents.dtype)[:, None, None, None, None]
            latents = (1 - scale) * latents + scale * noise
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return (pipe.video_processor.postprocess_video(video, output_type=output_type),)


register(LTX())
