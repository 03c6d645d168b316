"""Tiny random-weight diffusers pipelines of every supported family, built from configs and saved to disk.

Nothing here touches the network: the CLIP tokenizers are built from a hand-written vocab.json + merges.txt,
the T5 tokenizers from an in-memory (piece, score) vocabulary (transformers 5's tokenizers-backed T5Tokenizer
takes one), and every model from a config with seeded random weights. Each builder saves the pipeline with
save_pretrained and returns the directory, so tests load it back by path the way users do.

Sizes: a few tens of thousands of parameters per denoiser; VAEs with two blocks (vae_scale_factor 2), so a
32 x 32 image is a 16 x 16 latent (Flux: 8 x 8 = 64 packed tokens).
"""
import json
import os

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, PNDMScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

WORDS = ("a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "green", "tiny", "big", "image", "house",
         "car", "on", "in", "at", "night", "blurry", "ugly", "painting", "sunset", "tree")
CLIP_MAX_LEN = 16   # tokenizer model_max_length (the pipelines pad CLIP prompts to it)
T5_MAX_LEN = 16     # tests pass max_sequence_length=T5_MAX_LEN to SD3 / Flux
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------------------------------------- tokenizers


def clip_vocab_files(directory: str) -> tuple:
    """Write a small byte-level-BPE vocab.json + merges.txt covering WORDS; returns their paths."""
    chars = sorted(set("".join(WORDS)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in WORDS:  # merge every word left to right into one token
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    os.makedirs(directory, exist_ok=True)
    vpath, mpath = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vpath, "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vpath, mpath


def clip_tokenizer(directory: str) -> CLIPTokenizer:
    vpath, mpath = clip_vocab_files(directory)
    return CLIPTokenizer(vocab=vpath, merges=mpath, model_max_length=CLIP_MAX_LEN)


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer from an in-memory vocabulary: ids 0..2 are <pad>, </s>, <unk>."""
    chars = sorted(set("".join(WORDS)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LEN)


def clip_vocab_size(directory: str) -> int:
    return len(clip_tokenizer(directory))


# ---------------------------------------------------------------------------------------------- models


def _clip_config(vocab_size, hidden=32, projection=32, act="quick_gelu"):
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                          projection_dim=projection, num_attention_heads=4, num_hidden_layers=2, hidden_act=act,
                          layer_norm_eps=1e-5, max_position_embeddings=CLIP_MAX_LEN, vocab_size=vocab_size)


def _t5_encoder(vocab_size, d_model=32):
    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _vae(latent_channels=4, shift_factor=None, scaling_factor=0.18215, quant_conv=True):
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=quant_conv, use_post_quant_conv=quant_conv)


def _unet(cross_attention_dim=32, sdxl=False, linear_projection=False):
    torch.manual_seed(0)
    extra = {}
    if sdxl:  # added time ids (6 x addition_time_embed_dim) + pooled text embeddings (text_encoder_2 projection 32)
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                                use_linear_projection=linear_projection, **extra)


# ---------------------------------------------------------------------------------------------- pipelines


def build_sd(directory: str, prediction_type: str = "epsilon", scheduler: str = None) -> str:
    """SD 1.5-style (epsilon, PNDM scheduler like the real checkpoint) or, with prediction_type="v_prediction",
    SD 2.1-style (DDIM v-prediction scheduler like the real checkpoint, linear-projection transformer blocks)."""
    tok_dir = os.path.join(directory, "_tok")
    tokenizer = clip_tokenizer(tok_dir)
    v = prediction_type == "v_prediction"
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer), act="gelu" if v else "quick_gelu"))
    scheduler = scheduler or ("ddim" if v else "pndm")
    common = dict(prediction_type=prediction_type, steps_offset=1, **SD_BETAS)
    sched = {"pndm": lambda: PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common),
             "ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common),
             "euler": lambda: EulerDiscreteScheduler(**common)}[scheduler]()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=_unet(linear_projection=v), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, directory)


def build_sdxl(directory: str) -> str:
    """SDXL-style: two CLIP text encoders (the second with projection: pooled embeddings), added time ids,
    Euler scheduler like the real checkpoint."""
    tokenizer = clip_tokenizer(os.path.join(directory, "_tok"))
    torch.manual_seed(2)
    te1 = CLIPTextModel(_clip_config(len(tokenizer)))
    torch.manual_seed(4)
    te2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer), projection=32, act="gelu"))
    sched = EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading", **SD_BETAS)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=_unet(cross_attention_dim=64, sdxl=True),
                                     scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return _save(pipe, directory)


def build_sd3(directory: str) -> str:
    """SD3-style: two CLIP encoders with projection + T5, an MMDiT transformer, flow matching (shift 3)."""
    tokenizer = clip_tokenizer(os.path.join(directory, "_tok"))
    t5_tok = t5_tokenizer()
    torch.manual_seed(2)
    te1 = CLIPTextModelWithProjection(_clip_config(len(tokenizer)))
    torch.manual_seed(4)
    te2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer)))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(shift_factor=0.0609, scaling_factor=1.5035, quant_conv=False),
                                    text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer,
                                    text_encoder_3=_t5_encoder(len(t5_tok), d_model=64), tokenizer_3=t5_tok)
    return _save(pipe, directory)


def build_flux(directory: str, guidance_embeds: bool = True) -> str:
    """Flux-style: CLIP (pooled) + T5, a Flux transformer with a guidance embedding, packed 2 x 2 latents,
    flow matching with dynamic shifting like FLUX.1-dev."""
    tokenizer = clip_tokenizer(os.path.join(directory, "_tok"))
    t5_tok = t5_tokenizer()
    torch.manual_seed(2)
    te1 = CLIPTextModel(_clip_config(len(tokenizer)))
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611, quant_conv=False),
                        text_encoder=te1, tokenizer=tokenizer, text_encoder_2=_t5_encoder(len(t5_tok)),
                        tokenizer_2=t5_tok, transformer=transformer)
    return _save(pipe, directory)


BUILDERS = {
    "sd15": build_sd,
    "sd21": lambda d: build_sd(d, prediction_type="v_prediction"),
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
}


def build(kind: str, directory: str) -> str:
    """Build the tiny pipeline `kind` (one of BUILDERS) into `directory`; returns the directory."""
    return BUILDERS[kind](directory)


def _save(pipe, directory: str) -> str:
    path = os.path.join(directory, "pipeline")
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_unsupported(directory: str) -> str:
    """A saved pipeline of a class outside the supported families (unconditional DDPMPipeline)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3, out_channels=3,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    return _save(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), directory)


# ---------------------------------------------------------------------------------------------- image tasks


def build_controlnet(directory: str, sdxl: bool = False, seed: int = 0) -> str:
    """A ControlNetModel matching the tiny SD (or SDXL) UNet, saved with save_pretrained; returns the directory.
    Its zero convolutions get random weights (a trained ControlNet's are not zero either), so its residuals
    change the output and tests can see whether they are applied."""
    from diffusers import ControlNetModel
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32)
    torch.manual_seed(seed)
    net = ControlNetModel(block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=4,
                          cross_attention_dim=64 if sdxl else 32, attention_head_dim=4,
                          conditioning_embedding_out_channels=(8, 16), **extra)
    with torch.no_grad():
        for conv in list(net.controlnet_down_blocks) + [net.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.3)
    net.save_pretrained(directory, safe_serialization=True)
    return directory


def build_sd_inpaint(directory: str) -> str:
    """An SD inpainting pipeline whose UNet takes 9 channels (latents, mask, masked image latents), like
    stable-diffusion-inpainting; PNDM as the checkpoint ships."""
    from diffusers import StableDiffusionInpaintPipeline
    tokenizer = clip_tokenizer(os.path.join(directory, "_tok"))
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=32, attention_head_dim=4)
    sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD_BETAS)
    pipe = StableDiffusionInpaintPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=sched, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    return _save(pipe, directory)


def image(seed: int, height: int = 32, width: int = 32, mode: str = "RGB"):
    """A deterministic smooth PIL test image (low-frequency noise, so the VAE sees structure)."""
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(seed)
    small = g.uniform(0, 255, size=(height // 8 + 1, width // 8 + 1, 3))
    arr = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.BILINEAR))
    im = Image.fromarray(arr)
    return im.convert(mode)


def mask(height: int = 32, width: int = 32, box=(8, 8, 24, 20)):
    """A binary PIL mask: white (repaint) inside box = (left, top, right, bottom), black elsewhere."""
    from PIL import Image, ImageDraw
    m = Image.new("L", (width, height), 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m
