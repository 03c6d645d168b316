"""Decoding final latents the way each pipeline does after its loop, into the pipeline's own output class."""
import dataclasses

import torch

from .family import get_family

OUTPUT_TYPES = ("latent", "pt", "np", "pil")


def check_output_type(output_type):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def empty_fields(cls) -> tuple:
    return (None,) * len(dataclasses.fields(cls))


def output_of(cls, fields: tuple):
    return cls(**{f.name: v for f, v in zip(dataclasses.fields(cls), fields)})


@torch.no_grad()
def decode(pipe, latents, *, height, width, output_type="pil", generator=None, return_dict=True):
    """VAE-decode final latents as the pipeline's __call__ does after its loop and return what it returns:
    its output class (`.images`; SD also `.nsfw_content_detected`), or a tuple with return_dict=False.

    output_type: "latent" (the latents as they are, Flux's packed), "pt", "np" or "pil". Call it on one rank."""
    check_output_type(output_type)
    family = get_family(pipe)
    cls = family.output_class()
    if output_type == "latent":
        fields = (latents,) + empty_fields(cls)[1:]
    else:
        fields = family.decode(pipe, latents, height=height, width=width, output_type=output_type,
                               generator=generator)
    pipe.maybe_free_model_hooks()
    return output_of(cls, fields) if return_dict else fields
