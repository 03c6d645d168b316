"""Qwen-Image (QwenImagePipeline, QwenImageImg2ImgPipeline): QwenImageTransformer2DModel (an MMDiT) on 2 x 2-packed
latents of a one-frame video VAE, flow matching with dynamic shifting, Qwen2.5-VL prompts, and true classifier-free
guidance with the pipelines' norm rescale.

The pipelines call their guidance scale `true_cfg_scale` (default 4.0) and turn guidance on when it is above 1 and
a negative prompt is given; their `guidance_scale` feeds a guidance embedding no published checkpoint has. Here the
request's guidance_scale is that true_cfg_scale (Family.guidance_argument), and a transformer with a guidance
embedding is refused. Uncond and cond run as one doubled call (the pipelines make two): their prompt embeddings are
padded to one length once per request, the padding masked, so every token keeps its position.

Sequence parallelism: diffusers' plan for QwenImageTransformer2DModel (0.42.1) cuts the image tokens (an edit's
condition tokens behind them), the prompt's tokens and the prompt's mask into equal shares, one per rank of a
sequence group. The image tokens follow from the sizes (`sequence_tokens`, checked before loading); the prompt's do
not: the pipelines cut the prompt embeddings to the longest prompt's tokens, so their count varies with the prompt
(and with an edit's image, which Qwen2.5-VL reads with it). The adapter's answer: when its transformer runs context
parallelism, it pads the prompt embeddings with zeros, masked, to a multiple of the group's size before the call.
A masked token is no key of any attention, so every other token attends to what it did unsplit; a padded token's
own outputs are dropped (only the image stream is returned); the text's rotary positions count from its first
token, so every token keeps its position. The result is the unsplit call's (tests/test_sequence_parallel.py).
"""
import numpy as np
import torch

from ..evaluator import Shared, Static
from ..evaluator import attention_kwargs as static_values
from ..sequence import running
from .family import Family, packed, register, square
from .guidance import cfg
from .prepare import initial_noise
from .sd import vae_latents

PACKING = "the 2 x 2 latent packing"  # why sizes are multiples of twice the VAE scale factor


class QwenImageAdapter:
    """QwenImageTransformer2DModel as a runtime model: packed latents [rows, tokens, 4 C] (Qwen-Image-Edit: followed
    by the input image's packed latents, `image_latents`), timestep / 1000 as the pipelines pass it. model_kwargs:
    prompt_embeds and prompt_embeds_mask (absent where no token is padding), their negative_ versions and
    guidance_scale (present iff guidance is on), image_shapes (Shared: (frames, h, w) of each token grid),
    image_latents (edit), attention_kwargs ({"scale": Static(s)}: the LoRA scale)."""

    tensor_scalars = True  # float kwargs may arrive as 0-d device tensors (CUDA graphs): no host sync on them

    def __init__(self, transformer):
        self.transformer = transformer

    @torch.no_grad()
    def __call__(self, x, t, *, prompt_embeds, image_shapes, prompt_embeds_mask=None, negative_prompt_embeds=None,
                 negative_prompt_embeds_mask=None, guidance_scale=1.0, image_latents=None, attention_kwargs=None):
        tokens, inp = x.shape[1], x if image_latents is None else torch.cat([x, image_latents], dim=1)
        ts, emb, mask = t.to(x.dtype) / 1000, prompt_embeds, prompt_embeds_mask
        guided = negative_prompt_embeds is not None
        if guided:
            inp, ts = torch.cat([inp, inp]), torch.cat([ts, ts])
            emb = torch.cat([negative_prompt_embeds, prompt_embeds])
            mask = None if mask is None else torch.cat([negative_prompt_embeds_mask, mask])
        group = _group_size(self.transformer)
        if emb.shape[1] % group:  # split: the prompt padded, masked, to a multiple of the group (module docstring)
            emb, mask = _pad_to(emb, mask, -(-emb.shape[1] // group) * group)
        out = self.transformer(hidden_states=inp, timestep=ts, encoder_hidden_states=emb,
                               encoder_hidden_states_mask=mask, img_shapes=[list(image_shapes)] * len(inp),
                               attention_kwargs=static_values(attention_kwargs), return_dict=False)[0][:, :tokens]
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        comb = cfg(uncond, cond, guidance_scale)  # then rescaled to the conditional prediction's norm, per token
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def _group_size(transformer) -> int:
    """Ranks of the sequence group diffusers' context parallelism splits the transformer's tokens over (1: none)."""
    split = running(transformer)
    return 1 if split is None else split[0] * split[1]


def _pad_to(embeds, mask, length):
    """Embeddings [B, L, D] and their mask (None: no padding) padded with masked zeros to `length` tokens."""
    b, n = embeds.shape[:2]
    mask = torch.ones(b, n, dtype=torch.long, device=embeds.device) if mask is None else mask
    return (torch.cat([embeds, embeds.new_zeros(b, length - n, embeds.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(b, length - n)], dim=1))


class QwenImage(Family):
    """guidance_scale is the pipelines' true_cfg_scale: classifier-free guidance when > 1 with a negative prompt."""
    name = "qwen-image"
    pipeline_classes = {"QwenImagePipeline": "text2img", "QwenImageImg2ImgPipeline": "img2img"}
    schedulers = ("flow",)
    default_scheduler = "flow"
    default_steps = 50
    default_guidance = 4.0           # the pipelines' true_cfg_scale default
    guidance_argument = "true_cfg_scale"
    options = ("max_sequence_length", "lora_scale")
    lora_kwargs = "attention_kwargs"  # the call argument diffusers users pass the LoRA scale in
    strength_rule = "float"          # img2img keeps steps * strength steps, start index truncated
    img2img_size_from_image = False  # img2img: the image is resized to height / width (default: the model's size)
    max_sequence_length = 1024       # the pipelines refuse longer
    sequence_parallel = True  # QwenImageTransformer2DModel's _cp_plan, the prompt padded to the group (module doc)

    def output_class(self):
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
        return QwenImagePipelineOutput

    def adapter(self, pipe):
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("this Qwen-Image transformer has a guidance embedding (guidance_embeds=True), which no "
                             "published checkpoint has; the runtime's guidance_scale is the true_cfg_scale of "
                             "classifier-free guidance, so it cannot run this one")
        return QwenImageAdapter(pipe.transformer)

    def size_multiple(self, pipe):
        return packed(int(pipe.vae_scale_factor), PACKING)

    @staticmethod
    def _vae_scale(configs) -> int:
        """The pipelines' vae_scale_factor from the VAE config: 2 ** len(temperal_downsample)."""
        return 2 ** len((configs.get("vae") or {}).get("temperal_downsample", [False, True, True]))

    def rules_from_configs(self, configs):
        vsf = self._vae_scale(configs)
        # the pipelines' default_sample_size is 128
        return (*packed(vsf, PACKING), square(128, vsf), vsf * 2)

    def sequence_tokens(self, configs, resolved):
        """The packed image tokens, (height / 2 vsf) x (width / 2 vsf); the prompt's tokens are no rule (the adapter
        pads them to the group, see the module docstring)."""
        h, w = resolved.get("height"), resolved.get("width")
        if not (h and w):
            return {}
        m = 2 * self._vae_scale(configs)
        return {f"image tokens (height / {m} x width / {m})": (h // m) * (w // m)}

    def encode(self, pipe, prompt, negative_prompt, *, batch, num_images, guidance_scale, height, width, device,
               max_sequence_length, lora_scale, image=None):
        """image: Qwen-Image-Edit's input image, which its prompt encoder reads too."""
        seq = 512 if max_sequence_length is None else int(max_sequence_length)  # the pipelines' __call__ default
        if seq > self.max_sequence_length:
            raise ValueError(f"max_sequence_length={seq} is more than the {self.max_sequence_length} tokens the "
                             f"{self.name} pipelines take")
        common = dict(device=device, num_images_per_prompt=num_images, max_sequence_length=seq)
        if image is not None:
            common["image"] = image
        pos, mask = pipe.encode_prompt(prompt=prompt, **common)
        kw = {"prompt_embeds": pos}
        if guidance_scale > 1 and negative_prompt is not None:
            neg, neg_mask = pipe.encode_prompt(prompt=negative_prompt, **common)
            if mask is not None or neg_mask is not None or neg.shape[1] != pos.shape[1]:
                length = max(pos.shape[1], neg.shape[1])  # one length for the doubled call, padding masked
                pos, mask = _pad_to(pos, mask, length)
                neg, neg_mask = _pad_to(neg, neg_mask, length)
                kw.update(prompt_embeds=pos, negative_prompt_embeds_mask=neg_mask)
            kw.update(negative_prompt_embeds=neg, guidance_scale=float(guidance_scale))
        if mask is not None:
            kw["prompt_embeds_mask"] = mask
        if lora_scale is not None:
            kw["attention_kwargs"] = {"scale": Static(float(lora_scale))}
        return kw

    def prepare(self, pipe, model_kwargs, *, batch, height, width, generator, latents, device):
        """Packed latents [B, (h / 2) (w / 2), 4 C] (noise drawn as [B, 1, C, h, w]) and the token grid."""
        vsf, dtype = int(pipe.vae_scale_factor), model_kwargs["prompt_embeds"].dtype
        ch = pipe.transformer.config.in_channels // 4
        h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
        if latents is None:
            x = pipe._pack_latents(initial_noise((batch, 1, ch, h, w), generator, device, dtype, None), batch, ch, h, w)
        else:
            x = initial_noise((batch, (h // 2) * (w // 2), ch * 4), generator, device, dtype, latents)
        return x, {"image_shapes": Shared(((1, h // 2, w // 2),))}

    def timesteps_kwargs(self, pipe, scheduler, latents, steps):
        c = scheduler.config
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
        mu = calculate_shift(latents.shape[1], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist(), "mu": mu}

    @staticmethod
    def _stats(vae, like):
        """The VAE's per-channel latents mean and std, shaped [1, C, 1, 1, 1] like `like`."""
        view = lambda v: torch.tensor(v).view(1, vae.config.z_dim, 1, 1, 1).to(like.device, like.dtype)  # noqa
        return view(vae.config.latents_mean), view(vae.config.latents_std)

    def encode_image(self, pipe, image, generator, *, task="img2img"):
        """Normalized VAE latents [B, C, h, w] of a preprocessed image batch (img2img samples the latent
        distribution, Qwen-Image-Edit takes its mode), as the pipelines compute them."""
        vae = pipe.vae
        if task == "img2img":
            lat = vae_latents(vae, image.unsqueeze(2), generator)
        else:
            lat = vae.encode(image.unsqueeze(2)).latent_dist.mode()
        mean, std = self._stats(vae, lat)
        lat = (lat - mean) * (1.0 / std) if task == "img2img" else (lat - mean) / std
        return lat[:, :, 0]

    def pack(self, pipe, latents):
        """[B, C, h, w] latents -> the transformer's packed [B, (h / 2) (w / 2), 4 C]."""
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)

    def decode(self, pipe, latents, *, height, width, output_type, generator):
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        mean, std = self._stats(vae, latents)
        image = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]
        return (pipe.image_processor.postprocess(image, output_type=output_type),)


register(QwenImage())
