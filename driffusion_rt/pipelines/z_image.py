"""Z-Image (ZImagePipeline, ZImageImg2ImgPipeline; Z-Image-Turbo too): ZImageTransformer2DModel, a single-stream
DiT that takes lists of per-image latents and per-prompt caption features of their own lengths, float32 latents,
flow matching with the pipelines' sigmas and shift, Qwen3 prompts (the hidden states of the second-to-last layer).

Guidance is the pipelines' own: on when guidance_scale > 0 (Z-Image-Turbo runs with 0), pos + scale (pos - neg),
and the transformer's output is the negated velocity. The pipelines' cfg_normalization and cfg_truncation stay at
their defaults (off). The list-taking transformer is wrapped (`ZImageDenoiser`) so that a runtime call, and a
guidance pair's split of it, is on tensors: captions padded to one length with their lengths beside them, each
caption cut back to its own length before the transformer sees it.
"""
import torch

from ..evaluator import Static
from ..evaluator import attention_kwargs as static_values
from .family import Family, packed, register, vae_scale_of
from .prepare import initial_noise
from .sd import vae_latents

PACKING = "the transformer's 2 x 2 patches"  # why sizes are multiples of twice the VAE scale factor


class ZImageDenoiser(torch.nn.Module):
    """ZImageTransformer2DModel on tensors: latents [rows, C, h, w], the transformer's timesteps [rows], caption
    features padded to [rows, L, D] and their lengths [rows]; returns the outputs stacked [rows, C, h, w] in
    float32, as the pipelines stack them."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, captions, lengths, attention=None):
        latents = list(x.to(self.transformer.dtype).unsqueeze(2).unbind(dim=0))
        caps = [c[:n] for c, n in zip(captions, lengths.tolist())]
        out = self.transformer(latents, t, caps, joint_attention_kwargs=attention, return_dict=False)[0]
        return torch.stack([o.float() for o in out], dim=0).squeeze(2)


class ZImageAdapter:
    """The runtime model: the velocity -(pos + scale (pos - neg)), pos and neg as one doubled call. model_kwargs:
    prompt_embeds [B, L, D] and prompt_lengths [B], their negative_ versions and guidance_scale (present iff
    guidance is on), joint_attention_kwargs ({"scale": Static(s)}: the LoRA scale)."""
    cuda_graphs = False  # captions are cut to their lengths on the host

    def __init__(self, transformer):
        self.denoiser = ZImageDenoiser(transformer)  # what a guidance pair's hooks split (layout.DENOISERS)

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, prompt_lengths, negative_prompt_embeds=None,
                 negative_prompt_lengths=None, guidance_scale=0.0, joint_attention_kwargs=None):
        ts, att = (1000 - t.float()) / 1000, static_values(joint_attention_kwargs)
        if negative_prompt_embeds is None:
            return -self.denoiser(x, ts, prompt_embeds, prompt_lengths, att)
        out = self.denoiser(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([prompt_embeds, negative_prompt_embeds]),
                            torch.cat([prompt_lengths, negative_prompt_lengths]), att)
        pos, neg = out.chunk(2)
        return -(pos + guidance_scale * (pos - neg))


def _copied(prompts):
    """A list of prompts copied (the pipelines' encode_prompt rewrites the list it is given in place)."""
    return list(prompts) if isinstance(prompts, list) else prompts


def _padded(embeds: list, length: int, per: int) -> tuple:
    """Per-prompt features (each [L_i, D]), each repeated for the images of its prompt, as [B, length, D] padded with
    zeros, and their lengths [B]."""
    rows = [e for e in embeds for _ in range(per)]
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    for i, e in enumerate(rows):
        out[i, :len(e)] = e
    return out, torch.tensor([len(e) for e in rows], device=out.device)


class ZImage(Family):
    """guidance_scale: classifier-free guidance when > 0 (the pipelines' rule), pos + scale (pos - neg)."""
    name = "z-image"
    pipeline_classes = {"ZImagePipeline": "text2img", "ZImageImg2ImgPipeline": "img2img"}
    schedulers = ("flow",)
    default_scheduler = "flow"
    default_steps = 50
    default_guidance = 5.0
    options = ("max_sequence_length", "lora_scale")
    lora_kwargs = "joint_attention_kwargs"  # the call argument diffusers users pass the LoRA scale in
    strength_rule = "float"          # img2img keeps steps * strength steps, start index truncated
    img2img_size_from_image = True   # img2img: the image's own size unless asked otherwise

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
        return ZImagePipelineOutput

    def adapter(self, pipe):
        return ZImageAdapter(pipe.transformer)

    def size_multiple(self, pipe):
        return packed(int(pipe.vae_scale_factor), PACKING)

    def default_size(self, pipe):
        return 1024, 1024  # the pipelines' own default

    def rules_from_configs(self, configs):
        vsf = vae_scale_of(configs)
        return (*packed(vsf, PACKING), (1024, 1024), vsf * 2)

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               max_sequence_length, lora_scale):
        cfg = guidance_scale > 0  # the pipelines' do_classifier_free_guidance
        seq = 512 if max_sequence_length is None else int(max_sequence_length)
        pos, neg = pipe.encode_prompt(prompt=_copied(prompt), device=device, do_classifier_free_guidance=cfg,
                                      negative_prompt=_copied(negative_prompt), max_sequence_length=seq)
        length = max(len(e) for e in pos + (neg if cfg else []))  # one length for the doubled call
        embeds, lengths = _padded(pos, length, num_images)
        kw = dict(prompt_embeds=embeds, prompt_lengths=lengths)
        if cfg:
            neg_embeds, neg_lengths = _padded(neg, length, num_images)
            kw.update(negative_prompt_embeds=neg_embeds, negative_prompt_lengths=neg_lengths,
                      guidance_scale=float(guidance_scale))
        if lora_scale is not None:
            kw["joint_attention_kwargs"] = {"scale": Static(float(lora_scale))}
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        """float32 latents [B, C, h, w] (the text-to-image pipeline keeps them in float32)."""
        vsf = int(pipe.vae_scale_factor)
        shape = (batch, pipe.transformer.in_channels, 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2)))
        return initial_noise(shape, generator, device, torch.float32, latents), {}

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        c = scheduler.config
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
        mu = calculate_shift((latents.shape[2] // 2) * (latents.shape[3] // 2), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return {"sigmas": get_default_z_image_sigmas(steps), "mu": mu}

    def encode_image(self, pipe, image, generator, *, task="img2img"):
        """The VAE latents of a preprocessed image batch, shifted and scaled as the img2img pipeline does."""
        vae = pipe.vae
        return (vae_latents(vae, image, generator) - vae.config.shift_factor) * vae.config.scaling_factor

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return (pipe.image_processor.postprocess(image, output_type=output_type),)


register(ZImage())
