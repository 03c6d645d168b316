"""Fused draft and refine updates (installed as driffusion_rt.kernels).

Every draft and refine update of the runtime goes through `draft` and `refine` here. They are affine
maps with coefficients from the trajectory (DESIGN.md section 1):

    draft:  out[r] = sum_s coef[r, s] * inputs[s]          k outputs from 1..4 inputs, one pass
    refine: out    = sum_r w[r] * stack[r] + sum_q wz[q] * noise[q]   one output from m (+ q) inputs

Backend choice: Triton on CUDA tensors and under TRITON_INTERPRET=1 (how the tests run the kernels),
plain torch otherwise. `backend("torch")` / `backend("triton")` force one (DRIFFUSION_KERNELS sets the
default: auto, torch or triton).
"""
import contextlib
import os

import torch

from . import fallback

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("DRIFFUSION_KERNELS", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"DRIFFUSION_KERNELS={_backend!r} is not one of {_BACKENDS}")


@contextlib.contextmanager
def backend(name: str):
    """Force the kernel backend inside a `with` block: 'auto', 'torch' or 'triton'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {_BACKENDS}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(t: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return t.is_cuda or _interpreting()


def _check(out: torch.Tensor, tensors) -> list:
    """Reject a non-contiguous output; copy non-contiguous inputs to contiguous ones (never read storage order)."""
    if not out.is_contiguous():
        raise ValueError(f"kernel output must be contiguous (got shape {tuple(out.shape)}, strides {out.stride()})")
    fixed = []
    for t in tensors:
        if t.dtype != out.dtype or t.device != out.device:
            raise ValueError(f"kernel input {t.dtype} on {t.device} does not match output {out.dtype} on {out.device}")
        fixed.append(t if t.is_contiguous() else t.contiguous())
    return fixed


def draft(out: torch.Tensor, inputs, coef: torch.Tensor) -> torch.Tensor:
    """Write k drafts out[r] = sum_s coef[r, s] * inputs[s] in one pass over the 1..4 inputs.

    out: [k, *shape] contiguous; inputs: tensors of `shape`; coef: [k, len(inputs)] on out's device.
    """
    inputs = _check(out, inputs)
    if not 1 <= len(inputs) <= 4 or coef.shape != (out.shape[0], len(inputs)):
        raise ValueError(f"draft: coef shape {tuple(coef.shape)} does not match {out.shape[0]} outputs x {len(inputs)} inputs")
    if any(t.shape != out.shape[1:] for t in inputs):
        raise ValueError(f"draft: input shapes {[tuple(t.shape) for t in inputs]} differ from {tuple(out.shape[1:])}")
    if _use_triton(out):
        from . import fused
        return fused.draft(out, inputs, coef)
    return fallback.draft(out, inputs, coef)


def refine(out: torch.Tensor, stack: torch.Tensor, weights: torch.Tensor,
           noise: torch.Tensor | None = None, noise_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Write out = sum_r weights[r] * stack[r] + sum_q noise_weights[q] * noise[q] in one pass.

    out: [*shape] contiguous (may alias stack[0]); stack: [m, *shape]; weights: [m]; noise: [q, *shape] or None.
    """
    tensors = [stack] if noise is None else [stack, noise]
    stack, *rest = _check(out, tensors)
    noise = rest[0] if rest else None
    if stack.shape[1:] != out.shape or weights.shape != (stack.shape[0],):
        raise ValueError(f"refine: stack {tuple(stack.shape)} / weights {tuple(weights.shape)} do not match out {tuple(out.shape)}")
    if noise is not None and (noise.shape[1:] != out.shape or noise_weights is None or noise_weights.shape != (noise.shape[0],)):
        raise ValueError(f"refine: noise {tuple(noise.shape)} / noise_weights do not match out {tuple(out.shape)}")
    if _use_triton(out):
        from . import fused
        return fused.refine(out, stack, weights, noise, noise_weights)
    return fallback.refine(out, stack, weights, noise, noise_weights)
