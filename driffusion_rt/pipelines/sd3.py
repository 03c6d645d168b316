"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline): SD3Transformer2DModel, flow
matching, CLIP x 2 + T5."""
import torch

from ..evaluator import Static, attention_kwargs
from .family import Family, denoiser_config, register, square, vae_scale_of
from .guidance import guide
from .prepare import initial_noise
from .sd import vae_latents


class SD3Adapter:
    """SD3Transformer2DModel (flow matching) as a runtime model. model_kwargs: prompt_embeds, pooled_prompt_embeds,
    and their negative_ versions (present iff guidance is on), guidance_scale, joint_attention_kwargs
    ({"scale": Static(s)}: the LoRA scale)."""

    tensor_scalars = True  # float kwargs may arrive as 0-d device tensors (CUDA graphs): no host sync on them

    def __init__(self, transformer):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, guidance_scale=1.0, joint_attention_kwargs=None):
        cfg = negative_prompt_embeds is not None
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=prompt_embeds,
                               pooled_projections=pooled_prompt_embeds,
                               joint_attention_kwargs=attention_kwargs(joint_attention_kwargs),
                               return_dict=False)[0]
        return guide(out, guidance_scale)[0] if cfg else out


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_classes = {"StableDiffusion3Pipeline": "text2img", "StableDiffusion3Img2ImgPipeline": "img2img"}
    schedulers = ("flow", "flow-unipc", "flow-dpm++2m")
    default_scheduler = "flow"
    default_steps = 28
    default_guidance = 7.0
    options = ("clip_skip", "max_sequence_length", "lora_scale")
    lora_kwargs = "joint_attention_kwargs"  # the call argument diffusers users pass the LoRA scale in
    strength_rule = "float"          # img2img keeps steps * strength steps, start index truncated
    img2img_size_from_image = False  # img2img: the image is resized to height / width (default: the model's size)

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
        return StableDiffusion3PipelineOutput

    def adapter(self, pipe):
        return SD3Adapter(pipe.transformer)

    def size_multiple(self, pipe):
        return self._rule(int(pipe.vae_scale_factor), int(pipe.transformer.config.patch_size))

    @staticmethod
    def _rule(vsf: int, p: int) -> tuple:
        return vsf * p, f"VAE scale factor {vsf} x transformer patch size {p}"

    def rules_from_configs(self, configs):
        vsf, den = vae_scale_of(configs), denoiser_config(configs)
        return (*self._rule(vsf, int(den.get("patch_size", 1))), square(den.get("sample_size") or 128, vsf), vsf)

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               clip_skip, max_sequence_length, lora_scale):
        cfg = guidance_scale > 1
        seq = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, clip_skip=clip_skip,
            lora_scale=lora_scale, **seq)
        kw = dict(prompt_embeds=pos, pooled_prompt_embeds=pooled, guidance_scale=guidance_scale)
        if lora_scale is not None:
            kw["joint_attention_kwargs"] = {"scale": Static(float(lora_scale))}
        if cfg:
            kw.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        vsf = int(pipe.vae_scale_factor)
        shape = (batch, pipe.transformer.config.in_channels, height // vsf, width // vsf)
        return initial_noise(shape, generator, device, model_kwargs["prompt_embeds"].dtype, latents), {}

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        c = scheduler.config
        if not c.get("use_dynamic_shifting", None):
            return None
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
        p = pipe.transformer.config.patch_size
        mu = calculate_shift((latents.shape[2] // p) * (latents.shape[3] // p), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        return {"mu": mu}

    def encode_image(self, pipe, image, generator, *, task="img2img"):
        """The VAE latents of a preprocessed image batch, shifted and scaled as the img2img pipeline does."""
        vae = pipe.vae
        lat = vae_latents(vae, image, generator)
        return (lat - vae.config.shift_factor) * vae.config.scaling_factor

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.device), return_dict=False)[0]
        return (pipe.image_processor.postprocess(image, output_type=output_type),)


register(StableDiffusion3())
