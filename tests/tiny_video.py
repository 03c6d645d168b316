"""Tiny random-weight video pipelines (Wan 2.1 / 2.2, HunyuanVideo 1.5, LTX-Video), built from configs and saved.

No network: the T5 tokenizer comes from tiny_pipelines, the Qwen2 tokenizer of HunyuanVideo 1.5 is a byte-level
BPE over the 256 byte symbols (no merges) with a minimal chat template, ByT5 needs no files. Configs follow the
shapes of diffusers' own pipeline tests, so each denoiser has a few thousand parameters; the VAEs compress space
by 8 (Wan 2.1 / 2.2 A14B), 16 (Wan 2.2 TI2V-5B), 4 (HunyuanVideo 1.5) or 4 (LTX) and time by 4 (Wan, LTX) or 2
(HunyuanVideo 1.5). Each builder saves with save_pretrained and returns the directory.
"""
import os

import torch
from diffusers import (AutoencoderKLHunyuanVideo15, AutoencoderKLLTXVideo, AutoencoderKLWan,
                       FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel,
                       LTXPipeline, LTXVideoTransformer3DModel, UniPCMultistepScheduler, WanImageToVideoPipeline,
                       WanPipeline, WanTransformer3DModel)
from transformers import (ByT5Tokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection,
                          Qwen2Tokenizer, T5Config, T5EncoderModel)

import tiny_pipelines as tp

T5_MAX_LEN = tp.T5_MAX_LEN  # tests pass max_sequence_length=T5_MAX_LEN to Wan and LTX
WAN22_BOUNDARY = 0.875      # Wan 2.2 A14B's T2V boundary ratio: the second expert below t = 875


def _t5(d_model=32):
    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=len(tp.t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def _wan_transformer(seed=0, in_channels=16, out_channels=16, **extra):
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, **extra)


def _wan_vae(**extra):
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=extra.pop("z_dim", 16), dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], **extra)


def _wan_scheduler():
    """As Wan ships: UniPC with flow prediction, flow sigmas and a flow shift."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def build_wan21(directory: str) -> str:
    """Wan 2.1 T2V: one transformer."""
    return _save(WanPipeline(tokenizer=tp.t5_tokenizer(), text_encoder=_t5(), vae=_wan_vae(),
                             scheduler=_wan_scheduler(), transformer=_wan_transformer()), directory)


def build_wan22(directory: str) -> str:
    """Wan 2.2 A14B T2V: a high-noise transformer and a low-noise transformer_2 below the boundary timestep."""
    return _save(WanPipeline(tokenizer=tp.t5_tokenizer(), text_encoder=_t5(), vae=_wan_vae(),
                             scheduler=_wan_scheduler(), transformer=_wan_transformer(0),
                             transformer_2=_wan_transformer(7), boundary_ratio=WAN22_BOUNDARY), directory)


def build_wan22_ti2v(directory: str) -> str:
    """Wan 2.2 TI2V-5B: one transformer, per-token timesteps (expand_timesteps), a VAE with 2 x 2 patching."""
    return _save(WanPipeline(tokenizer=tp.t5_tokenizer(), text_encoder=_t5(), vae=_ti2v_vae(),
                             scheduler=_wan_scheduler(), transformer=_wan_transformer(in_channels=48, out_channels=48),
                             expand_timesteps=True), directory)


def _ti2v_vae():
    return _wan_vae(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                    latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_spatial=16, scale_factor_temporal=4)


def build_wan22_ti2v_i2v(directory: str) -> str:
    """Wan 2.2 TI2V-5B image-to-video: the image's latent frame mixed into the input and kept clean (timestep 0)."""
    return _save(WanImageToVideoPipeline(tokenizer=tp.t5_tokenizer(), text_encoder=_t5(), vae=_ti2v_vae(),
                                         scheduler=_wan_scheduler(),
                                         transformer=_wan_transformer(in_channels=48, out_channels=48),
                                         expand_timesteps=True), directory)


def build_wan21_i2v(directory: str) -> str:
    """Wan 2.1 I2V: the image's VAE latents and mask concatenated to the input, CLIP image embeddings."""
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=4,
        intermediate_size=16, patch_size=1))
    return _save(WanImageToVideoPipeline(
        tokenizer=tp.t5_tokenizer(), text_encoder=_t5(), vae=_wan_vae(), scheduler=_wan_scheduler(),
        image_processor=CLIPImageProcessor(crop_size=4, size=4), image_encoder=image_encoder,
        transformer=_wan_transformer(in_channels=36, image_dim=4)), directory)


def build_wan22_i2v(directory: str) -> str:
    """Wan 2.2 A14B I2V: two experts on the image-conditioned input, no CLIP image encoder."""
    return _save(WanImageToVideoPipeline(
        tokenizer=tp.t5_tokenizer(), text_encoder=_t5(), vae=_wan_vae(), scheduler=_wan_scheduler(),
        transformer=_wan_transformer(0, in_channels=36), transformer_2=_wan_transformer(7, in_channels=36),
        boundary_ratio=0.9), directory)


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols (no merges), with the chat markers and a minimal chat template."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):  # GPT-2's byte -> symbol map: unprintable bytes move to 256 and up
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    tok = Qwen2Tokenizer(vocab={chr(c): i for i, c in enumerate(codes)}, merges=[], unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def build_hunyuan15(directory: str) -> str:
    """HunyuanVideo 1.5 T2V: Qwen2.5-VL text + ByT5 glyph encoders, the guider component carrying the CFG scale."""
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel
    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)
    tok = qwen2_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0))
    byt5 = ByT5Tokenizer()
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(byt5), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0))
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder.eval(), tokenizer=tok, transformer=transformer.eval(),
                                  vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  text_encoder_2=text_encoder_2.eval(), tokenizer_2=byt5,
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))
    return _save(pipe, directory)


def shrink_hunyuan15(pipe):
    """Shorten HunyuanVideo 1.5's per-instance text lengths (not saved: the pipeline sets them in __init__) so that a
    tiny run does not attend over 1000 padded text tokens: a short system message, its template prefix cropped as
    the pipeline crops the real one, 24 Qwen tokens, 8 ByT5 tokens, 4 image-token slots. Both the runtime and the
    reference pipeline call read these attributes, so comparisons stay like for like."""
    pipe.system_message = "describe"
    prefix = f"<|im_start|>system\n{pipe.system_message}<|im_end|>\n<|im_start|>user\n"
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix).input_ids)
    pipe.tokenizer_max_length = 24
    pipe.tokenizer_2_max_length = 8
    pipe.vision_num_semantic_tokens = 4
    return pipe


def build_ltx(directory: str) -> str:
    """LTX-Video: T5 text encoder, packed tokens, flow matching with dynamic shifting and a terminal shift as the
    LTX-Video 0.9 checkpoints ship."""
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=1, caption_channels=32)
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False),
                                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                decoder_causal=False)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    return _save(LTXPipeline(scheduler=sched, vae=vae, text_encoder=_t5(), tokenizer=tp.t5_tokenizer(),
                             transformer=transformer), directory)


BUILDERS = {
    "wan21": build_wan21,
    "wan22": build_wan22,
    "wan22-5b": build_wan22_ti2v,
    "wan21-i2v": build_wan21_i2v,
    "wan22-5b-i2v": build_wan22_ti2v_i2v,
    "wan22-i2v": build_wan22_i2v,
    "hunyuan15": build_hunyuan15,
    "ltx": build_ltx,
}


def build(kind: str, directory: str) -> str:
    return BUILDERS[kind](directory)


def load(path: str):
    """Load a saved tiny video pipeline by path the way users do (HunyuanVideo 1.5 shrunk, see shrink_hunyuan15)."""
    from driffusion_rt.pipelines import load_pipeline
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    if type(pipe).__name__ == "HunyuanVideo15Pipeline":
        shrink_hunyuan15(pipe)
    return pipe


def _save(pipe, directory: str) -> str:
    path = os.path.join(directory, "pipeline")
    pipe.save_pretrained(path, safe_serialization=True)
    return path
