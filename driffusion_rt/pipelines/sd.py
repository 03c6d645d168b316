"""Stable Diffusion 1.5 / 2.1 (StableDiffusionPipeline): UNet2DConditionModel, epsilon or v-prediction."""
import math

import torch

from .. import schedulers as named
from .core import Family, draw_noise, guide, register, rescale


class UNetAdapter:
    """UNet2DConditionModel (SD 1.5 / 2.1 / SDXL) as a runtime model, classifier-free guidance inside.

    model_kwargs: prompt_embeds [B, L, D]; negative_prompt_embeds (present iff guidance is on); guidance_scale,
    guidance_rescale (floats, 0-d tensors under CUDA graphs; guidance_rescale present iff it is on); SDXL:
    text_embeds / negative_text_embeds [B, P], time_ids / negative_time_ids [B, 6]; timestep_cond [B, C] for UNets
    with time_cond_proj_dim."""

    tensor_scalars = True  # float kwargs may arrive as 0-d device tensors (CUDA graphs): no host sync on them

    def __init__(self, unet):
        self.unet = unet

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, negative_prompt_embeds=None, guidance_scale=1.0, guidance_rescale=None,
                 text_embeds=None, negative_text_embeds=None, time_ids=None, negative_time_ids=None,
                 timestep_cond=None):
        cfg = negative_prompt_embeds is not None
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            if added is not None:
                added = {"text_embeds": torch.cat([negative_text_embeds, text_embeds]),
                         "time_ids": torch.cat([negative_time_ids, time_ids])}
        out = self.unet(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                        added_cond_kwargs=added, return_dict=False)[0]
        if not cfg:
            return out
        out, cond = guide(out, guidance_scale)
        # on or off is decided by the kwarg's presence (host side): a tensor factor must not be compared here
        if guidance_rescale is not None and (isinstance(guidance_rescale, torch.Tensor) or guidance_rescale > 0.0):
            out = rescale(out, cond, guidance_rescale)
        return out


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    schedulers = tuple(named.VP)
    default_scheduler = "ddim"
    default_steps = 50
    default_guidance = 7.5
    options = ("clip_skip", "guidance_rescale")

    def output_class(self):
        from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
        return StableDiffusionPipelineOutput

    def adapter(self, pipe):
        return UNetAdapter(pipe.unet)

    def size_multiple(self, pipe):
        vsf = int(pipe.vae_scale_factor)  # the SD / SDXL pipelines require multiples of 8
        return math.lcm(8, vsf), f"multiples of 8 and of the VAE scale factor {vsf}"

    def default_size(self, pipe):
        vsf, s = int(pipe.vae_scale_factor), pipe.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s[:2]
        return h * vsf, w * vsf

    @staticmethod
    def cfg(pipe, guidance_scale) -> bool:
        """Classifier-free guidance is on, as the pipelines decide it (not for guidance-embedding UNets)."""
        return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               clip_skip, guidance_rescale):
        cfg = self.cfg(pipe, guidance_scale)
        pos, neg = pipe.encode_prompt(prompt, device, num_images, cfg, negative_prompt, clip_skip=clip_skip)
        return unet_kwargs(pipe, pos, neg, cfg, batch, guidance_scale, guidance_rescale, device)

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        vsf = int(pipe.vae_scale_factor)
        shape = (batch, pipe.unet.config.in_channels, height // vsf, width // vsf)
        return draw_noise(shape, generator, device, model_kwargs["prompt_embeds"].dtype, latents), {}

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm), nsfw


def unet_kwargs(pipe, pos, neg, cfg, batch, guidance_scale, guidance_rescale, device) -> dict:
    """The UNetAdapter kwargs every UNet family shares: embeddings, guidance, the guidance-embedding timestep_cond."""
    kw = dict(prompt_embeds=pos.to(device), guidance_scale=guidance_scale)
    if guidance_rescale > 0:  # absent when off, so the adapter decides without reading a (graph-time) tensor
        kw["guidance_rescale"] = float(guidance_rescale)
    if cfg:
        kw["negative_prompt_embeds"] = neg.to(device)
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(guidance_scale - 1).repeat(batch)
        kw["timestep_cond"] = pipe.get_guidance_scale_embedding(
            w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=pos.dtype)
    return kw


register(StableDiffusion())
