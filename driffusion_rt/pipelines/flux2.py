"""Flux.2 [dev] (Flux2Pipeline, text-to-image): Flux2Transformer2DModel on 2 x 2-patchified, packed latents with
4-axis position ids, flow matching with the pipeline's empirical shift, Mistral 3 prompts (hidden states of three
layers) and a guidance embedding (the checkpoint is guidance-distilled: no classifier-free guidance, so no
guidance pairs).

Not supported: the pipeline's reference images (`image=`, multi-reference editing) and prompt upsampling
(caption_upsample_temperature); text_encoder_out_layers stays the pipeline's (10, 20, 30).

Sequence parallelism is diffusers' plan for Flux2Transformer2DModel as is: it splits the packed image tokens, the
prompt's tokens (the pipeline pads the prompt to max_sequence_length) and their position ids; the joint and the
single-stream attention exchange them."""
import numpy as np
import torch

from ..evaluator import Static
from ..evaluator import attention_kwargs as static_values
from .family import Family, packed, register, square, vae_scale_of
from .prepare import initial_noise

PACKING = "the 2 x 2 latent patches"  # why sizes are multiples of twice the VAE scale factor
TEXT_TOKENS = 512  # Flux2Pipeline's default max_sequence_length


class Flux2Adapter:
    """Flux2Transformer2DModel as a runtime model: packed latents [rows, tokens, 4 C], timestep / 1000 as the
    pipeline passes it. model_kwargs: prompt_embeds, text_ids and image_ids (per-row position ids [B, L, 4]),
    guidance ([B] guidance values), joint_attention_kwargs ({"scale": Static(s)}: the LoRA scale)."""

    tensor_scalars = True  # float kwargs may arrive as 0-d device tensors (CUDA graphs): no host sync on them

    def __init__(self, transformer):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, text_ids, image_ids, guidance, joint_attention_kwargs=None):
        return self.transformer(hidden_states=x.to(self.transformer.dtype), timestep=t.to(x.dtype) / 1000,
                                guidance=guidance, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                img_ids=image_ids, joint_attention_kwargs=static_values(joint_attention_kwargs),
                                return_dict=False)[0]


class Flux2(Family):
    """guidance_scale is the guidance embedding (on every call, as in Flux2Pipeline); a negative prompt is ignored,
    as by every family whose calls are not guided."""
    name = "flux2"
    pipeline_classes = {"Flux2Pipeline": "text2img"}
    schedulers = ("flow",)
    default_scheduler = "flow"
    default_steps = 50
    default_guidance = 4.0
    options = ("max_sequence_length", "lora_scale")
    lora_kwargs = "attention_kwargs"  # the call argument diffusers users pass the LoRA scale in
    sequence_parallel = True  # Flux2Transformer2DModel's _cp_plan splits the image and the text tokens

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput
        return Flux2PipelineOutput

    def adapter(self, pipe):
        return Flux2Adapter(pipe.transformer)

    def size_multiple(self, pipe):
        return packed(int(pipe.vae_scale_factor), PACKING)

    def rules_from_configs(self, configs):
        vsf = vae_scale_of(configs)
        # Flux2Pipeline's default_sample_size is 128
        return (*packed(vsf, PACKING), square(128, vsf), vsf * 2)

    def sequence_tokens(self, configs, resolved):
        """The packed image tokens and the prompt's tokens (padded to max_sequence_length by the pipeline)."""
        out = {"text tokens (max_sequence_length)": resolved.get("max_sequence_length") or TEXT_TOKENS}
        h, w = resolved.get("height"), resolved.get("width")
        if h and w:
            m = 2 * vae_scale_of(configs)
            out[f"image tokens (height / {m} x width / {m})"] = (h // m) * (w // m)
        return out

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               max_sequence_length, lora_scale):
        seq = TEXT_TOKENS if max_sequence_length is None else int(max_sequence_length)
        embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=num_images,
                                              max_sequence_length=seq)
        kw = dict(prompt_embeds=embeds, text_ids=text_ids,
                  guidance=torch.full([batch], guidance_scale, device=device, dtype=torch.float32))
        if lora_scale is not None:
            kw["joint_attention_kwargs"] = {"scale": Static(float(lora_scale))}
        return kw

    def _grid(self, pipe, height, width) -> tuple:
        vsf = int(pipe.vae_scale_factor)
        return height // (vsf * 2), width // (vsf * 2)

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        """Packed latents [B, h w, 4 C], drawn as the pipeline draws them ([B, 4 C, h, w], its `latents` shape), and
        their position ids."""
        h, w = self._grid(pipe, height, width)
        shape = (batch, pipe.transformer.config.in_channels, h, w)
        x = initial_noise(shape, generator, device, model_kwargs["prompt_embeds"].dtype, latents)
        return pipe._pack_latents(x), {"image_ids": pipe._prepare_latent_ids(x).to(device)}

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
        kw = {"mu": compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)}
        if not scheduler.config.get("use_flow_sigmas", False):
            kw["sigmas"] = np.linspace(1.0, 1 / steps, steps).tolist()
        return kw

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        h, w = self._grid(pipe, height, width)
        ids = pipe._prepare_latent_ids(latents.new_empty(latents.shape[0], 1, h, w)).to(latents.device)
        latents = pipe._unpack_latents_with_ids(latents, ids)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                               latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean).to(vae.device)
        image = vae.decode(latents, return_dict=False)[0]
        return (pipe.image_processor.postprocess(image, output_type=output_type),)


register(Flux2())
