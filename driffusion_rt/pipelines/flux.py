"""Flux.1 (FluxPipeline, FluxImg2ImgPipeline): FluxTransformer2DModel on 2 x 2-packed latents, flow matching with
dynamic shifting, a guidance embedding (guidance-distilled checkpoints) and optional true classifier-free guidance."""
import numpy as np
import torch

from ..evaluator import Shared, Static, attention_kwargs
from .family import Family, packed, register, square, vae_scale_of
from .guidance import cfg, guide
from .prepare import initial_noise
from .sd import vae_latents

PACKING = "the 2 x 2 latent packing"  # why sizes are multiples of twice the VAE scale factor
TEXT_TOKENS = 512  # FluxPipeline's default max_sequence_length


class FluxAdapter:
    """FluxTransformer2DModel as a runtime model: packed latents [rows, tokens, C], timestep / 1000 as the Flux
    pipeline passes it, the guidance embedding ([B] guidance values, guidance-distilled checkpoints), and true
    classifier-free guidance (true_cfg_scale > 1 with a negative prompt: uncond and cond in one batched call,
    where the pipeline makes two calls). model_kwargs: prompt_embeds, pooled_prompt_embeds, text_ids, img_ids
    (Shared), guidance, negative_* (present iff true CFG is on), true_cfg_scale, and batched_cfg: whether uncond
    and cond share their text ids and shapes, so they can be one batched call (decided once per request);
    joint_attention_kwargs ({"scale": Static(s)}: the LoRA scale)."""

    tensor_scalars = True  # float kwargs may arrive as 0-d device tensors (CUDA graphs): no host sync on them

    @staticmethod
    def guided(model_kwargs: dict) -> bool:
        """True CFG as one doubled transformer call (not two: a cfg pair could not split those)."""
        return "negative_prompt_embeds" in model_kwargs and bool(model_kwargs.get("batched_cfg"))

    def __init__(self, transformer):
        self.transformer = transformer

    def _run(self, x, t, prompt_embeds, pooled, text_ids, img_ids, guidance, attention=None):
        """One FluxPipeline transformer call (attention: joint_attention_kwargs)."""
        return self.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                                pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                txt_ids=text_ids, img_ids=img_ids, joint_attention_kwargs=attention,
                                return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, guidance=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, negative_text_ids=None,
                 true_cfg_scale=1.0, batched_cfg=False, joint_attention_kwargs=None):
        att = attention_kwargs(joint_attention_kwargs)
        if negative_prompt_embeds is None:
            return self._run(x, t, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, guidance, att)
        if batched_cfg:
            out = self._run(torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([negative_prompt_embeds, prompt_embeds]),
                            torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds]), text_ids, img_ids,
                            None if guidance is None else torch.cat([guidance, guidance]), att)
            return guide(out, true_cfg_scale)[0]
        cond = self._run(x, t, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, guidance, att)
        uncond = self._run(x, t, negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids, img_ids,
                           guidance, att)
        return cfg(uncond, cond, true_cfg_scale)


class Flux(Family):
    """guidance_scale is the guidance *embedding*; classifier-free guidance is true_cfg_scale > 1 with a
    negative prompt, as in FluxPipeline."""
    name = "flux"
    pipeline_classes = {"FluxPipeline": "text2img", "FluxImg2ImgPipeline": "img2img"}
    schedulers = ("flow",)
    default_scheduler = "flow"
    default_steps = 28
    default_guidance = 3.5
    options = ("true_cfg_scale", "max_sequence_length", "lora_scale")
    lora_kwargs = "joint_attention_kwargs"  # the call argument diffusers users pass the LoRA scale in
    strength_rule = "float"          # img2img keeps steps * strength steps, start index truncated
    img2img_size_from_image = False  # img2img: the image is resized to height / width (default: the model's size)
    sequence_parallel = True  # FluxTransformer2DModel's _cp_plan splits the image and the text tokens

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
        return FluxPipelineOutput

    def adapter(self, pipe):
        return FluxAdapter(pipe.transformer)

    def size_multiple(self, pipe):
        return packed(int(pipe.vae_scale_factor), PACKING)

    def rules_from_configs(self, configs):
        vsf = vae_scale_of(configs)
        # FluxPipeline's default_sample_size is 128
        return (*packed(vsf, PACKING), square(128, vsf), vsf * 2)

    def sequence_tokens(self, configs, resolved):
        """The packed image tokens and the prompt's text tokens (the joint attention splits both)."""
        vsf = vae_scale_of(configs)
        out = {"text tokens (max_sequence_length)": resolved.get("max_sequence_length") or TEXT_TOKENS}
        h, w = resolved.get("height"), resolved.get("width")
        if h and w:
            out[f"image tokens (height / {2 * vsf} x width / {2 * vsf})"] = (h // (2 * vsf)) * (w // (2 * vsf))
        return out

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               true_cfg_scale, max_sequence_length, lora_scale):
        seq = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
        pos, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                   num_images_per_prompt=num_images, lora_scale=lora_scale, **seq)
        kw = dict(prompt_embeds=pos, pooled_prompt_embeds=pooled, text_ids=Shared(text_ids))
        if lora_scale is not None:
            kw["joint_attention_kwargs"] = {"scale": Static(float(lora_scale))}
        if true_cfg_scale > 1 and negative_prompt is not None:
            neg, neg_pooled, neg_ids = pipe.encode_prompt(prompt=negative_prompt, prompt_2=None, device=device,
                                                          num_images_per_prompt=num_images, lora_scale=lora_scale,
                                                          **seq)
            kw.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
                      negative_text_ids=Shared(neg_ids), true_cfg_scale=float(true_cfg_scale),
                      batched_cfg=neg.shape == pos.shape and torch.equal(neg_ids, text_ids))
        if pipe.transformer.config.guidance_embeds:
            kw["guidance"] = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        """Packed latents [B, (h / 2) (w / 2), 4 C] and the image token ids (a per-shape constant: Shared)."""
        vsf, dtype = int(pipe.vae_scale_factor), model_kwargs["prompt_embeds"].dtype
        ch = pipe.transformer.config.in_channels // 4
        h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
        if latents is None:
            x = pipe._pack_latents(initial_noise((batch, ch, h, w), generator, device, dtype, None), batch, ch, h, w)
        else:
            x = initial_noise((batch, (h // 2) * (w // 2), ch * 4), generator, device, dtype, latents)
        return x, {"img_ids": Shared(pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, dtype))}

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        c = scheduler.config
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # heavy: seconds to import
        mu = calculate_shift(latents.shape[1], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        kw = {"mu": mu}
        if not c.get("use_flow_sigmas", False):
            kw["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()
        return kw

    def encode_image(self, pipe, image, generator, *, task="img2img"):
        """The VAE latents of a preprocessed image batch (unpacked), shifted and scaled as the img2img pipeline does."""
        vae = pipe.vae
        lat = vae_latents(vae, image, generator)
        return (lat - vae.config.shift_factor) * vae.config.scaling_factor

    def pack(self, pipe, latents):
        """[B, C, h, w] latents -> the transformer's packed [B, (h / 2) (w / 2), 4 C]."""
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.device), return_dict=False)[0]
        return (pipe.image_processor.postprocess(image, output_type=output_type),)


register(Flux())
