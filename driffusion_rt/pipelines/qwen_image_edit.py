"""Qwen-Image-Edit (QwenImageEditPipeline): Qwen-Image's transformer, scheduler and guidance (qwen_image.py) on an
input image, the "edit" task (conditioning.Edit). The pipeline resizes the image to about 1024 x 1024 pixels at its
aspect ratio; Qwen2.5-VL reads it with the prompt (so both prompts are encoded with it), and its VAE latents (the
distribution's mode) are packed and appended to the latent tokens of every call, the output cut back to the
latent's own tokens. The output size defaults to the resized image's. Under sequence parallelism the transformer's
image tokens are the output's and the condition's together (`sequence_tokens`).
"""
from ..evaluator import Shared
from .family import register
from .qwen_image import QwenImage

EDIT_AREA = 1024 * 1024  # pixels the pipeline resizes the input image to


class QwenImageEdit(QwenImage):
    """An edit needs its image (one image and one prompt per request; num_images for several results)."""
    name = "qwen-image-edit"
    pipeline_classes = {"QwenImageEditPipeline": "edit"}

    def edit_size(self, height: int, width: int) -> tuple:
        """(height, width) the pipeline resizes an input image of this size to: EDIT_AREA pixels at its aspect
        ratio, in multiples of 32; the output's default size."""
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
        w, h, _ = calculate_dimensions(EDIT_AREA, width / height)
        return int(h), int(w)

    def sequence_tokens(self, configs, resolved):
        """The packed tokens of the output and of the edited image (resized to edit_size), which the transformer
        takes as one sequence (the prompt's are padded by the adapter, qwen_image.py). resolved["image"]: the image's
        {"height", "width"}, as a request resolves it (none yet: nothing to count)."""
        h, w, image = resolved.get("height"), resolved.get("width"), resolved.get("image")
        if not (h and w and image):
            return {}
        m = 2 * self._vae_scale(configs)
        ch, cw = self.edit_size(image["height"], image["width"])
        return {f"image tokens (height / {m} x width / {m} of the output and of the edited image resized to {ch} x "
                f"{cw})": (h // m) * (w // m) + (ch // m) * (cw // m)}

    def _resized(self, pipe, image):
        h, w = self.edit_size(image.height, image.width)
        return pipe.image_processor.resize(image, h, w), h, w

    def prompt_image(self, pipe, image):
        """The image as the prompt encoder reads it (PIL, resized)."""
        return self._resized(pipe, image)[0]

    def edit_pixels(self, pipe, image):
        """The image as the VAE encodes it: resized, then preprocessed to [1, 3, h, w] in [-1, 1]."""
        resized, h, w = self._resized(pipe, image)
        return pipe.image_processor.preprocess(resized, h, w)

    def encode(self, pipe, prompt, negative_prompt, *, image=None, **kwargs):
        if image is None:
            raise ValueError(f"{type(pipe).__name__} edits an image: pass image= (the picture to edit)")
        return super().encode(pipe, prompt, negative_prompt, image=image, **kwargs)

    def encode_image(self, pipe, image, generator, *, task="edit"):
        """Normalized VAE latents [B, C, h, w]: the mode of the latent distribution, as the pipeline takes it."""
        vae = pipe.vae
        lat = vae.encode(image.unsqueeze(2)).latent_dist.mode()
        mean, std = self._stats(vae, lat)
        return ((lat - mean) / std)[:, :, 0]

    def condition(self, pipe, model_kwargs, latents):
        """The image's latents [B, C, h, w] as model kwargs: packed tokens appended to every call's, and their grid
        after the output's in image_shapes."""
        h, w = latents.shape[2:]
        model_kwargs.update(image_latents=self.pack(pipe, latents),
                            image_shapes=Shared(model_kwargs["image_shapes"].value + ((1, h // 2, w // 2),)))


register(QwenImageEdit())
