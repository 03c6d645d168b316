"""Wan 2.1 / 2.2 (WanPipeline text-to-video, WanImageToVideoPipeline image-to-video): WanTransformer3DModel on
[B, C, F, H, W] latents, UniPC with flow prediction as shipped, umT5 prompts.

Wan 2.2 A14B has two experts: `transformer` for timesteps t >= boundary_ratio * num_train_timesteps (high noise) and
`transformer_2` below, each with its guidance scale (guidance_scale, guidance_scale_2). The pipeline decides per
step; here the rows of one model call may sit on both sides of the boundary (the drafts of one round), so the
adapter decides per row, by the same comparison on the same timestep value, and runs each expert on its rows.
Wan 2.2 TI2V-5B (expand_timesteps) gives the transformer one timestep per latent token; for image-to-video it keeps
the image's frame clean (timestep 0) and mixes it back into the input and the result.

Image-to-video fits the adapter as a per-request conditioning: the image's VAE latents and mask are concatenated
to the model input (2.1 / 2.2 A14B) or mixed into it (TI2V-5B), and Wan 2.1's CLIP image embeddings go to the
transformer's image attention; all of it is computed once in prepare, on every rank.
"""
import math

import torch

from ..evaluator import Shared
from .family import denoiser_config, register
from .prepare import initial_noise
from .video import VideoFamily


class WanAdapter:
    """WanTransformer3DModel (one or two experts) as a runtime model, classifier-free guidance inside (uncond and
    cond as one batched call where the pipeline makes two). model_kwargs: prompt_embeds, negative_prompt_embeds
    (present iff guidance is on), guidance_scale, guidance_scale_2 (Wan 2.2); image-to-video: condition (latents
    + mask), image_embeds (Wan 2.1: [B, images, S, D]), first_frame_mask (TI2V-5B, Shared)."""
    cuda_graphs = False  # the expert is chosen per row from the timestep values: see video.py

    def __init__(self, transformer, transformer_2=None, boundary=None, expand_timesteps=False):
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary, self.expand_timesteps = boundary, expand_timesteps

    def _timestep(self, x, t, first_frame_mask):
        """[rows] timesteps, or with expand_timesteps one per token (2 x 2 patches), as the pipelines build them."""
        if not self.expand_timesteps:
            return t
        mask = first_frame_mask[0, 0] if first_frame_mask is not None else \
            torch.ones(x.shape[2:], dtype=torch.float32, device=x.device)
        return mask[:, ::2, ::2].flatten()[None, :] * t[:, None]

    def _expert(self, model, scale, x, t, prompt_embeds, negative_prompt_embeds, condition, image_embeds,
                first_frame_mask):
        if first_frame_mask is not None:      # TI2V-5B image-to-video: the image's frame mixed in
            inp = (1 - first_frame_mask) * condition + first_frame_mask * x
        elif condition is not None:           # 2.1 / 2.2 A14B image-to-video: mask and image latents as channels
            inp = torch.cat([x, condition], dim=1)
        else:
            inp = x
        inp, ts = inp.to(model.dtype), self._timestep(x, t, first_frame_mask)
        flat = (lambda e: None if e is None else e.flatten(0, 1))  # [rows, images, S, D] -> the pipeline's layout
        if negative_prompt_embeds is None:
            return model(hidden_states=inp, timestep=ts, encoder_hidden_states=prompt_embeds,
                         encoder_hidden_states_image=flat(image_embeds), return_dict=False)[0]
        out = model(hidden_states=torch.cat([inp, inp]), timestep=torch.cat([ts, ts]),
                    encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
                    encoder_hidden_states_image=None if image_embeds is None else flat(torch.cat([image_embeds] * 2)),
                    return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, negative_prompt_embeds=None, guidance_scale=1.0,
                 guidance_scale_2=None, condition=None, image_embeds=None, first_frame_mask=None):
        rows = [x, t, prompt_embeds, negative_prompt_embeds, condition, image_embeds]
        if self.boundary is None:
            return self._expert(self.transformer, guidance_scale, *rows, first_frame_mask)
        high = t >= self.boundary  # the pipeline's test, `t >= boundary_timestep`, on each row's own timestep
        n_high = int(high.sum())
        if n_high == len(t):
            return self._expert(self.transformer, guidance_scale, *rows, first_frame_mask)
        if n_high == 0:
            return self._expert(self.transformer_2, guidance_scale_2, *rows, first_frame_mask)
        # a call straddling the boundary: each expert on its rows, with its own guidance scale
        hi, lo = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
        pick = (lambda v, i: None if v is None else v[i])
        out_hi = self._expert(self.transformer, guidance_scale, *[pick(v, hi) for v in rows], first_frame_mask)
        out_lo = self._expert(self.transformer_2, guidance_scale_2, *[pick(v, lo) for v in rows], first_frame_mask)
        out = torch.empty((len(t),) + tuple(out_hi.shape[1:]), dtype=out_hi.dtype, device=out_hi.device)
        out[hi], out[lo] = out_hi, out_lo.to(out.dtype)
        return out


class Wan(VideoFamily):
    """WanPipeline and WanImageToVideoPipeline (Wan 2.1, 2.2 A14B with two experts, 2.2 TI2V-5B)."""
    name = "wan"
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")
    schedulers = ("flow-unipc", "flow", "flow-dpm++2m")
    default_scheduler = "flow-unipc"
    default_steps = 50
    default_guidance = 5.0
    default_frames = 81
    options = ("max_sequence_length",)
    video_options = ("guidance_scale_2", "image", "last_image")
    sequence_parallel = True  # WanTransformer3DModel's _cp_plan splits the video tokens (the prompt stays whole)

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
        return WanPipelineOutput

    @staticmethod
    def i2v(pipe) -> bool:
        return any(c.__name__ == "WanImageToVideoPipeline" for c in type(pipe).__mro__)

    @staticmethod
    def boundary(pipe):
        ratio = pipe.config.get("boundary_ratio", None)
        return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps

    def adapter(self, pipe):
        if pipe.transformer is None:
            raise ValueError("the Wan pipeline has no `transformer` (the high-noise expert); load it with one")
        boundary = self.boundary(pipe)
        if boundary is not None and pipe.transformer_2 is None:
            raise ValueError(f"the Wan pipeline has boundary_ratio={pipe.config.boundary_ratio} but no "
                             f"transformer_2 (the low-noise expert)")
        return WanAdapter(pipe.transformer, pipe.transformer_2 if boundary is not None else None, boundary,
                          bool(pipe.config.get("expand_timesteps", False)))

    def size_multiple(self, pipe):
        vsf, p = int(pipe.vae_scale_factor_spatial), pipe.transformer.config.patch_size
        m = math.lcm(16, vsf * p[1], vsf * p[2])
        return m, f"multiples of 16 and of the VAE scale factor {vsf} x transformer patch {p[1]} x {p[2]}"

    def sequence_tokens(self, configs, resolved):
        """The video tokens: latent frames x latent rows x latent columns, over the transformer's patches."""
        vae, p = configs.get("vae") or {}, tuple(denoiser_config(configs).get("patch_size") or (1, 2, 2))
        # the VAE's scale factors, with the pipelines' defaults for a config without them
        vsf, vst = vae.get("scale_factor_spatial") or 8, vae.get("scale_factor_temporal") or 4
        h, w, f = (resolved.get(k) for k in ("height", "width", "num_frames"))
        if not (h and w and f):
            return {}
        n = ((f - 1) // vst + 1) // p[0] * (h // vsf // p[1]) * (w // vsf // p[2])
        return {f"video tokens (latent frames x height / {vsf * p[1]} x width / {vsf * p[2]})": n}

    def default_size(self, pipe):
        return 480, 832  # the pipelines' own defaults

    def frame_rule(self, pipe):
        step = int(pipe.vae_scale_factor_temporal)
        return step, f"its VAE compresses time by {step} after the first frame"

    def default_fps(self, pipe):
        return 24 if pipe.config.get("expand_timesteps", False) else 16  # TI2V-5B: 24 fps; 2.1 / A14B: 16 fps

    def check_options(self, pipe, options):
        if options["guidance_scale_2"] is not None and self.boundary(pipe) is None:
            raise ValueError(f"guidance_scale_2={options['guidance_scale_2']!r} applies to Wan 2.2 pipelines with "
                             f"two experts (boundary_ratio set); this pipeline has one transformer")
        if self.i2v(pipe) and options["image"] is None:
            raise ValueError("image is required: WanImageToVideoPipeline animates an image (PIL image or tensor)")
        if not self.i2v(pipe):
            for name in ("image", "last_image"):
                if options[name] is not None:
                    raise ValueError(f"{name} applies to WanImageToVideoPipeline; this is a {type(pipe).__name__} "
                                     f"(text-to-video)")

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               max_sequence_length, guidance_scale_2, image, last_image):
        cfg = guidance_scale > 1  # the pipeline's do_classifier_free_guidance: the first scale decides
        seq = 512 if max_sequence_length is None else int(max_sequence_length)
        pos, neg = pipe.encode_prompt(prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
                                      num_videos_per_prompt=num_images, max_sequence_length=seq, device=device)
        model = pipe.transformer
        kw = dict(prompt_embeds=pos.to(model.dtype), guidance_scale=guidance_scale)
        if self.boundary(pipe) is not None:
            kw["guidance_scale_2"] = guidance_scale if guidance_scale_2 is None else float(guidance_scale_2)
        if cfg:
            kw["negative_prompt_embeds"] = neg.to(model.dtype)
        if self.i2v(pipe) and model.config.image_dim is not None:  # Wan 2.1 I2V: CLIP image embeddings
            embeds = pipe.encode_image(image if last_image is None else [image, last_image], device)
            # [B, images, S, D]: first dim the batch, so the runtime repeats it for the drafts
            kw["image_embeds"] = embeds.unsqueeze(0).repeat(batch, 1, 1, 1).to(model.dtype)
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, num_frames, generator, latents, device, options):
        """float32 noise [B, C, (F - 1) / 4 + 1, H / 8, W / 8] (the pipelines keep Wan latents in float32);
        image-to-video also encodes the image (and last image) into the condition the adapter reads."""
        vsf, vst = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        shape = (batch, pipe.vae.config.z_dim if self.i2v(pipe) else pipe.transformer.config.in_channels,
                 (num_frames - 1) // vst + 1, height // vsf, width // vsf)
        if not self.i2v(pipe):
            return initial_noise(shape, generator, device, torch.float32, latents), {}
        if latents is not None:
            latents = initial_noise(shape, generator, device, torch.float32, latents)
        image = pipe.video_processor.preprocess(options["image"], height=height, width=width).to(device, torch.float32)
        last = options["last_image"]
        if last is not None:
            last = pipe.video_processor.preprocess(last, height=height, width=width).to(device, torch.float32)
        out = pipe.prepare_latents(image, batch, shape[1], height, width, num_frames, torch.float32, device,
                                   generator, latents, last)
        extra = {"condition": out[1]}
        if pipe.config.get("expand_timesteps", False):
            extra["first_frame_mask"] = Shared(out[2])
        return out[0], extra

    def final_latents(self, pipe, latents, model_kwargs):
        mask = model_kwargs.get("first_frame_mask")
        if mask is None:
            return latents
        return (1 - mask.value) * model_kwargs["condition"] + mask.value * latents

    def decode(self, pipe, latents, *, height, width, output_type, generator, options=None):
        vae = pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device,
                                                                                          latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device,
                                                                                                  latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return (pipe.video_processor.postprocess_video(video, output_type=output_type),)


register(Wan())
