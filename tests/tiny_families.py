"""Tiny random-weight Qwen-Image, Qwen-Image-Edit, Flux.2 and Z-Image pipelines, built from configs and saved.

No network: the tokenizer is tiny_video's byte-level Qwen2 BPE (no merges) with the markers each pipeline's chat
template uses; every model is built from a config with seeded random weights; each builder saves the pipeline with
save_pretrained and returns the directory, so tests load it back by path the way users do.

Sizes: denoisers of a few thousand parameters; VAEs that compress by 4 (Qwen-Image: a 32 x 32 image is 4 x 4 = 16
packed tokens) or 2 (Flux.2, Z-Image: 8 x 8 = 64 tokens). Qwen-Image-Edit's VAE compresses by 16: its pipeline always
resizes the input image to about 1024 x 1024 pixels, which is then about 32 x 32 = 1024 condition tokens.

Qwen-Image-Edit needs a Qwen2VLProcessor, which transformers 5 cannot build without torchvision (its video
processor); `OfflineQwen2VLProcessor` is the same processor without a video processor, and the saved pipeline names
this module as the processor's library so that loading by path finds it (tests/ must be importable).
"""
import json
import os

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                       Flux2Pipeline, Flux2Transformer2DModel, QwenImageEditPipeline, QwenImagePipeline,
                       QwenImageTransformer2DModel, ZImagePipeline, ZImageTransformer2DModel)
from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor, Qwen3Config, Qwen3Model)
# diffusers' loader looks the saving / loading base classes up in the module that defines a component's class
from transformers import ProcessorMixin  # noqa: F401

import tiny_video

VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# a chat template for the list-of-parts messages Flux.2 sends and the plain strings Z-Image sends
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer(vision: bool = False):
    tok = tiny_video.qwen2_tokenizer()
    if vision:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]})
    tok.chat_template = CHAT
    return tok


def _qwen_vl(tok, vision_ids=None):
    """Qwen2.5-VL with a 2-layer text model of width 16 (the transformer's joint_attention_dim) and a 2-layer
    vision tower (14-pixel patches merged 2 x 2)."""
    ids = vision_ids or {}
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(bos_token_id=None, eos_token_id=None, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tok), rope_theta=1000000.0,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=len(tok), bos_token_id=None, eos_token_id=None, **ids)).eval()


def _qwen_transformer():
    """2 heads: Ulysses 2 gives each rank one (tests/test_sequence_parallel.py)."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def _qwen_vae(downsamples: int):
    """z_dim 4; compresses by 2 ** downsamples (Qwen-Image's own VAE: 3, i.e. 8)."""
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * (downsamples + 1), num_res_blocks=1,
                                  temperal_downsample=[False] + [True] * (downsamples - 1),
                                  latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2])


def _flow(**extra):
    """Qwen-Image's scheduler as shipped: exponential time shift, dynamic shifting, a terminal shift."""
    return FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                           max_shift=0.9, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                                           use_dynamic_shifting=True, **extra)


def build_qwen(directory: str) -> str:
    """Qwen-Image text-to-image (its img2img pipeline is made from it with for_task)."""
    tok = tokenizer()
    pipe = QwenImagePipeline(scheduler=_flow(), vae=_qwen_vae(2), text_encoder=_qwen_vl(tok), tokenizer=tok,
                             transformer=_qwen_transformer())
    return _save(pipe, directory)


class OfflineQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor (which needs torchvision in transformers 5): the tokenizer and
    the PIL image processor, saved and loaded as their own files. (diffusers finds how to load a component from
    its library's module: ProcessorMixin is imported above so that it finds from_pretrained here.)"""

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:  # the missing video processor
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return cls(Qwen2VLImageProcessorPil.from_pretrained(path), Qwen2Tokenizer.from_pretrained(path))


def edit_processor(tok):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    # at most 56 x 56 pixels reach the vision tower: 4 x 4 patches, 4 image tokens in the prompt
    return OfflineQwen2VLProcessor(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56), tok)


def build_qwen_edit(directory: str) -> str:
    """Qwen-Image-Edit: the prompt is encoded with the image by Qwen2.5-VL's vision tower, the image's latents
    are appended to the latent tokens. VAE compression 16 (see the module docstring)."""
    tok = tokenizer(vision=True)
    ids = dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id"),
                   tok.convert_tokens_to_ids(list(VISION_TOKENS))))
    pipe = QwenImageEditPipeline(scheduler=_flow(), vae=_qwen_vae(4), text_encoder=_qwen_vl(tok, ids), tokenizer=tok,
                                 processor=edit_processor(tok), transformer=_qwen_transformer())
    path = _save(pipe, directory)
    index = os.path.join(path, "model_index.json")
    with open(index, encoding="utf-8") as f:
        config = json.load(f)
    config["processor"] = [__name__, "OfflineQwen2VLProcessor"]
    with open(index, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path


def build_flux2(directory: str) -> str:
    """Flux.2 [dev]: Mistral 3 hidden states of layers 10, 20 and 30 (so 30 layers of width 8), a Flux.2
    transformer with the guidance embedding, a VAE with batch-norm statistics. The pipeline's tokenizer is a
    processor in the real checkpoint; a tokenizer with a chat template does the same for text prompts."""
    tok = tokenizer()
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                         max_position_embeddings=1024, num_attention_heads=2, num_hidden_layers=30,
                         num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=16, image_size=30, patch_size=6, num_channels=3),
        image_token_index=1, pad_token_id=tok.pad_token_id)).eval()
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4])
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # batch-norm statistics other than (0, 1), so decoding shows whether they are applied
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae,
                         text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    return _save(pipe, directory)


def build_zimage(directory: str) -> str:
    """Z-Image: Qwen3 hidden states (second to last layer) of the chat-formatted prompt, the single-stream Z-Image
    transformer on lists of per-image latents and captions, flow matching with shift 3 as Z-Image ships."""
    tok = tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                                          max_position_embeddings=1024)).eval()
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 32, 32])
    with torch.no_grad():  # created with torch.empty: give them values
        transformer.x_pad_token.normal_(0.0, 1.0)
        transformer.cap_pad_token.normal_(0.0, 1.0)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tok, transformer=transformer)
    return _save(pipe, directory)


BUILDERS = {"qwen": build_qwen, "qwen-edit": build_qwen_edit, "flux2": build_flux2, "zimage": build_zimage}


def build(kind: str, directory: str) -> str:
    return BUILDERS[kind](directory)


def _save(pipe, directory: str) -> str:
    path = os.path.join(directory, "pipeline")
    pipe.save_pretrained(path, safe_serialization=True)
    return path
