"""Stable Diffusion XL (StableDiffusionXLPipeline): the SD UNet with pooled text embeddings and time ids as added
conditions; decode with the VAE's latent mean / std, fp16 upcast and watermark as the pipeline does."""
import torch

from .. import schedulers as named
from .core import Family, register
from .sd import StableDiffusion, unet_kwargs


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    schedulers = tuple(named.VP)
    default_scheduler = "euler"
    default_steps = 50
    default_guidance = 5.0
    options = ("clip_skip", "guidance_rescale")

    def output_class(self):
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
        return StableDiffusionXLPipelineOutput

    default_size = Family.default_size  # the pipeline's default_sample_size, as SDXL's __call__ uses it

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               clip_skip, guidance_rescale):
        cfg = self.cfg(pipe, guidance_scale)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, clip_skip=clip_skip)
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                     text_encoder_projection_dim=proj).to(device).repeat(batch, 1)
        kw = dict(text_embeds=pooled.to(device), time_ids=ids)
        if cfg:  # the pipeline's default negative time ids equal the positive ones
            kw.update(negative_text_embeds=neg_pooled.to(device), negative_time_ids=ids)
        kw.update(unet_kwargs(pipe, pos, neg, cfg, batch, guidance_scale, guidance_rescale, device))
        return kw

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.device), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return (pipe.image_processor.postprocess(image, output_type=output_type),)


register(StableDiffusionXL())
