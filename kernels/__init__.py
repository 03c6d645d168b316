"""The fused combine of draft and refine updates (installed as driffusion_rt.kernels).

Every draft and refine update of the runtime is one call of `combine` on the round's buffer (docs/design.md section 1):

    arena[out_rows[r]] = sum_s coef[r, s] * arena[in_rows[s]]        k outputs from s inputs, one pass

Backend choice: Triton on CUDA tensors and under TRITON_INTERPRET=1 (how the tests run the kernel), plain torch
otherwise. `backend("torch")` / `backend("triton")` force one (DRIFFUSION_KERNELS sets the default: auto, torch or
triton).
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


def combine(arena: torch.Tensor, out_rows: torch.Tensor, in_rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Write arena[out_rows[r]] = sum_s coef[r, s] * arena[in_rows[s]] for every r in one pass over the inputs.

    arena: [R, ...] contiguous (the rows of a round); out_rows [k], in_rows [s]: int64 row numbers on arena's
    device (out_rows distinct; they may repeat input rows: every input is read before any output is written);
    coef: [k, s] (accumulation is float32, float64 for float64 data). Returns arena."""
    if not arena.is_contiguous():
        raise ValueError(f"combine: the arena must be contiguous (shape {tuple(arena.shape)}, strides {arena.stride()})")
    if out_rows.dim() != 1 or in_rows.dim() != 1 or coef.shape != (out_rows.numel(), in_rows.numel()):
        raise ValueError(f"combine: coef {tuple(coef.shape)} does not match {out_rows.numel()} outputs x "
                         f"{in_rows.numel()} inputs")
    for name, t in (("out_rows", out_rows), ("in_rows", in_rows), ("coef", coef)):
        if t.device != arena.device:
            raise ValueError(f"combine: {name} is on {t.device}, the arena on {arena.device}")
    if out_rows.dtype != torch.int64 or in_rows.dtype != torch.int64:
        raise ValueError("combine: row numbers must be int64 tensors")
    if _use_triton(arena):
        from . import fused  # imports triton: only when a combine runs on it
        if arena.is_cuda:
            with torch.cuda.device(arena.device):  # Triton launches on the current device
                return fused.combine(arena, out_rows, in_rows, coef)
        return fused.combine(arena, out_rows, in_rows, coef)
    return fallback.combine(arena, out_rows, in_rows, coef)
