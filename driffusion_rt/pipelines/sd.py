"""Stable Diffusion 1.5 / 2.1 (StableDiffusionPipeline and its img2img, inpainting and ControlNet pipelines):
UNet2DConditionModel, epsilon or v-prediction."""
import torch

from .. import schedulers as named
from ..evaluator import Static, attention_kwargs
from .family import Family, denoiser_config, lcm8, register, square, vae_scale_of
from .guidance import guide, rescale
from .prepare import initial_noise


class UNetAdapter:
    """UNet2DConditionModel (SD 1.5 / 2.1 / SDXL) as a runtime model, classifier-free guidance inside, with the
    pipeline's ControlNet(s) run inside the same call when it has one.

    model_kwargs: prompt_embeds [B, L, D]; negative_prompt_embeds (present iff guidance is on); guidance_scale,
    guidance_rescale (floats, 0-d tensors under CUDA graphs; guidance_rescale present iff it is on); SDXL:
    text_embeds / negative_text_embeds [B, P], time_ids / negative_time_ids [B, 6]; timestep_cond [B, C] for UNets
    with time_cond_proj_dim; cross_attention_kwargs ({"scale": Static(s)}: the LoRA scale, baked into a CUDA
    graph). ControlNet: control_image (one [B, 3, H, W] per net), control_scale ([rows, nets]: conditioning scale x
    control_guidance_start / end at each row's own trajectory index, a PerStep kwarg), guess_mode. Inpainting UNets
    (9 input channels): mask [B, 1, h, w] and masked_image_latents [B, 4, h, w]."""

    tensor_scalars = True  # float kwargs may arrive as 0-d device tensors (CUDA graphs): no host sync on them

    def __init__(self, unet, controlnet=None):
        self.unet = unet
        self.controlnets = None if controlnet is None else list(getattr(controlnet, "nets", [controlnet]))

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, negative_prompt_embeds=None, guidance_scale=1.0, guidance_rescale=None,
                 text_embeds=None, negative_text_embeds=None, time_ids=None, negative_time_ids=None,
                 timestep_cond=None, cross_attention_kwargs=None, control_image=None, control_scale=None,
                 guess_mode=False, mask=None, masked_image_latents=None):
        cfg = negative_prompt_embeds is not None
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        cond = (x, t, prompt_embeds, added)  # the conditional half alone: ControlNet's guess mode sees only it
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            if added is not None:
                added = {"text_embeds": torch.cat([negative_text_embeds, text_embeds]),
                         "time_ids": torch.cat([negative_time_ids, time_ids])}
        residuals = {}
        if control_image is not None:
            guessed = guess_mode and cfg
            residuals = self._control(*(cond if guessed else (x, t, prompt_embeds, added)), control_image,
                                      control_scale, guess_mode, double=cfg and not guess_mode, pad=guessed)
        if mask is not None:  # inpainting UNet: the mask and the masked image's latents as extra input channels
            if cfg:
                mask, masked_image_latents = torch.cat([mask, mask]), torch.cat([masked_image_latents] * 2)
            x = torch.cat([x, mask, masked_image_latents], dim=1)
        out = self.unet(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=timestep_cond,
                        cross_attention_kwargs=attention_kwargs(cross_attention_kwargs), added_cond_kwargs=added,
                        return_dict=False,
                        **residuals)[0]
        if not cfg:
            return out
        out, cond = guide(out, guidance_scale)
        # on or off is decided by the kwarg's presence (host side): a tensor factor must not be compared here
        if guidance_rescale is not None and (isinstance(guidance_rescale, torch.Tensor) or guidance_rescale > 0.0):
            out = rescale(out, cond, guidance_rescale)
        return out

    def _control(self, x, t, embeds, added, images, scales, guess_mode, double, pad) -> dict:
        """The UNet's additional residuals: each net at scale 1, scaled per row by its scale (the nets scale
        their outputs linearly, guess mode's per-block factors included), summed over nets as MultiControlNet
        sums them. double: the control image and scales for the [uncond; cond] batch; pad: guess mode under
        guidance, where the unconditional half gets zero residuals."""
        down = mid = None
        for k, net in enumerate(self.controlnets):
            image, s = images[k], scales[:, k]
            if double:
                image, s = torch.cat([image, image]), torch.cat([s, s])
            d, m = net(x, t, encoder_hidden_states=embeds, controlnet_cond=image, conditioning_scale=1.0,
                       guess_mode=guess_mode, added_cond_kwargs=added, return_dict=False)
            s = s.to(m.dtype).view(-1, *[1] * (m.dim() - 1))
            d, m = [r * s for r in d], m * s
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if pad:
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = {"StableDiffusionPipeline": "text2img", "StableDiffusionImg2ImgPipeline": "img2img",
                        "StableDiffusionInpaintPipeline": "inpaint",
                        "StableDiffusionControlNetPipeline": "controlnet"}
    schedulers = tuple(named.VP)
    default_scheduler = "ddim"
    default_steps = 50
    default_guidance = 7.5
    options = ("clip_skip", "guidance_rescale", "lora_scale")
    lora_kwargs = "cross_attention_kwargs"  # the call argument diffusers users pass the LoRA scale in
    strength_rule = "truncate"      # img2img keeps int(steps * strength) steps
    img2img_size_from_image = True  # img2img: the output has the input image's size (rounded to the VAE's factor)

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
        return StableDiffusionPipelineOutput

    def adapter(self, pipe):
        return UNetAdapter(pipe.unet, getattr(pipe, "controlnet", None))

    default_sample_size = 64  # the UNet's sample size when its config has none

    def size_multiple(self, pipe):
        return lcm8(int(pipe.vae_scale_factor))  # the SD / SDXL pipelines require multiples of 8

    def rules_from_configs(self, configs):
        vsf = vae_scale_of(configs)
        sample = denoiser_config(configs).get("sample_size") or self.default_sample_size
        return (*lcm8(vsf), square(sample, vsf), vsf)

    def default_size(self, pipe):
        vsf, s = int(pipe.vae_scale_factor), pipe.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s[:2]
        return h * vsf, w * vsf

    @staticmethod
    def cfg(pipe, guidance_scale) -> bool:
        """Classifier-free guidance is on, as the pipelines decide it (not for guidance-embedding UNets)."""
        return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               clip_skip, guidance_rescale, lora_scale):
        cfg = self.cfg(pipe, guidance_scale)
        pos, neg = pipe.encode_prompt(prompt, device, num_images, cfg, negative_prompt, clip_skip=clip_skip,
                                      lora_scale=lora_scale)
        return unet_kwargs(pipe, pos, neg, cfg, batch, guidance_scale, guidance_rescale, device, lora_scale)

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        vsf = int(pipe.vae_scale_factor)
        shape = (batch, pipe.unet.config.in_channels, height // vsf, width // vsf)
        return initial_noise(shape, generator, device, model_kwargs["prompt_embeds"].dtype, latents), {}

    def encode_image(self, pipe, image, generator, *, task="img2img"):
        """The VAE latents of a preprocessed image batch [N, 3, H, W] (in the latents' dtype), scaled as the
        img2img / inpainting pipelines scale them; a list of generators encodes image i with generator i."""
        vae = pipe.vae
        lat = vae_latents(vae, image, generator)
        return vae.config.scaling_factor * lat

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
        denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm), nsfw


def vae_latents(vae, image, generator):
    """A sample of the VAE's latent distribution for an image batch, as the pipelines' retrieve_latents draws it
    (unscaled); a list of generators encodes image i with generator i."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents  # heavy
    if isinstance(generator, list):
        return torch.cat([retrieve_latents(vae.encode(image[i: i + 1]), generator=g) for i, g in enumerate(generator)])
    return retrieve_latents(vae.encode(image), generator=generator)


def unet_kwargs(pipe, pos, neg, cfg, batch, guidance_scale, guidance_rescale, device, lora_scale=None) -> dict:
    """The UNetAdapter kwargs every UNet family shares: embeddings, guidance, the guidance-embedding timestep_cond
    and the per-call LoRA scale."""
    kw = dict(prompt_embeds=pos.to(device), guidance_scale=guidance_scale)
    if guidance_rescale > 0:  # absent when off, so the adapter decides without reading a (graph-time) tensor
        kw["guidance_rescale"] = float(guidance_rescale)
    if lora_scale is not None:
        kw["cross_attention_kwargs"] = {"scale": Static(float(lora_scale))}
    if cfg:
        kw["negative_prompt_embeds"] = neg.to(device)
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(guidance_scale - 1).repeat(batch)
        kw["timestep_cond"] = pipe.get_guidance_scale_embedding(
            w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=pos.dtype)
    return kw


register(StableDiffusion())
