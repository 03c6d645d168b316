"""Stable Diffusion XL (StableDiffusionXLPipeline and its img2img, inpainting and ControlNet pipelines): the SD UNet
with pooled text embeddings and time ids as added conditions; decode with the VAE's latent mean / std, fp16 upcast
and watermark as the pipeline does."""
import inspect

import torch

from .. import schedulers as named
from .family import register
from .sd import StableDiffusion, unet_kwargs, vae_latents

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the img2img / inpainting pipelines' defaults


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = {"StableDiffusionXLPipeline": "text2img", "StableDiffusionXLImg2ImgPipeline": "img2img",
                        "StableDiffusionXLInpaintPipeline": "inpaint",
                        "StableDiffusionXLControlNetPipeline": "controlnet"}
    schedulers = tuple(named.VP)
    default_scheduler = "euler"
    default_steps = 50
    default_guidance = 5.0
    options = ("clip_skip", "guidance_rescale", "lora_scale")
    default_sample_size = 128  # the UNet's sample size when its config has none

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
        return StableDiffusionXLPipelineOutput

    def default_size(self, pipe):
        """The pipeline's default_sample_size as SDXL's __call__ uses it (img2img / inpainting pipelines have none:
        the UNet's sample size, as the inpainting pipeline uses it)."""
        s = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        s = s * int(pipe.vae_scale_factor)
        return s, s

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               clip_skip, guidance_rescale, lora_scale):
        cfg = self.cfg(pipe, guidance_scale)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, clip_skip=clip_skip, lora_scale=lora_scale)
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        size = (height, width)
        if "aesthetic_score" in inspect.signature(pipe._get_add_time_ids).parameters:
            # img2img / inpainting pipelines: aesthetic scores replace the target size when the UNet wants them
            ids, neg_ids = pipe._get_add_time_ids(size, (0, 0), size, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE,
                                                  size, (0, 0), size, dtype=pos.dtype,
                                                  text_encoder_projection_dim=proj)
        else:  # the pipeline's default negative time ids equal the positive ones
            ids = neg_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pos.dtype,
                                                   text_encoder_projection_dim=proj)
        kw = dict(text_embeds=pooled.to(device), time_ids=ids.to(device).repeat(batch, 1))
        if cfg:
            kw.update(negative_text_embeds=neg_pooled.to(device), negative_time_ids=neg_ids.to(device).repeat(batch, 1))
        kw.update(unet_kwargs(pipe, pos, neg, cfg, batch, guidance_scale, guidance_rescale, device, lora_scale))
        return kw

    def encode_image(self, pipe, image, generator, *, task="img2img"):
        """As StableDiffusion.encode_image, with the VAE upcast to float32 when its config asks (fp16 overflow) and,
        for img2img, the VAE's latent mean / std (the inpainting pipeline scales only)."""
        vae, dtype = pipe.vae, image.dtype
        if vae.config.force_upcast:
            image = image.float()
            vae.to(dtype=torch.float32)
        try:
            lat = vae_latents(vae, image, generator)
        finally:
            if vae.config.force_upcast:
                vae.to(dtype)
        lat = lat.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if task == "img2img" and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(lat.device, dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(lat.device, dtype)
            return (lat - mean) * vae.config.scaling_factor / std
        return vae.config.scaling_factor * lat

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
