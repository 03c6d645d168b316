"""Image inputs as the pipelines' image processors take them: PIL images, paths, encoded bytes, arrays, tensors."""
import io
import os

import numpy as np
import PIL.Image
import torch


def open_image(source, what: str = "image"):
    """A PIL image (RGB) from a path or encoded bytes (PNG, JPEG, ...); ValueError naming `what` otherwise."""
    label = f"{what} {source!r}" if isinstance(source, (str, os.PathLike)) else what
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"{label} cannot be read as an image: {type(e).__name__}: {e}") from None


def read_image(value, what: str = "image"):
    """An image input as the pipelines' image processors take it: a PIL image, a path (opened here), an array
    [H, W, C] / [B, H, W, C] or a tensor [C, H, W] / [B, C, H, W], or a non-empty list of them."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{what} is an empty list")
        return [read_image(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (str, os.PathLike, bytes, bytearray)):
        return open_image(value, what)
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim not in (3, 4) or 0 in value.shape:
            raise ValueError(f"{what} must be [H, W, C] / [B, H, W, C] (array) or [C, H, W] / [B, C, H, W] "
                             f"(tensor), got shape {tuple(value.shape)}")
        return value
    raise ValueError(f"{what} must be a PIL image, a path, a numpy array or a torch tensor (or a list of them), "
                     f"got {type(value).__name__}")


def first_image(image):
    """The first image of an input (a list's first entry, else the input)."""
    return image[0] if isinstance(image, list) else image


def image_count(image) -> int:
    """Images in an input (a list, or the batch dim of a 4-D array / tensor)."""
    if isinstance(image, list):
        return len(image)
    return image.shape[0] if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4 else 1
