"""Plain-torch combine: the reference semantics of the fused kernel, and the CPU path."""
import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half/bfloat16/float32 data accumulate in float32; float64 data in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def combine(arena: torch.Tensor, out_rows: torch.Tensor, in_rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """arena[out_rows[r]] = sum_s coef[r, s] * arena[in_rows[s]], accumulated in float32 (float64 for float64).
    All inputs are read before any output is written, so output rows may be input rows."""
    acc = accum_dtype(arena.dtype)
    flat = arena.view(arena.shape[0], -1)
    y = coef.to(acc) @ flat.index_select(0, in_rows).to(acc)
    flat.index_copy_(0, out_rows, y.to(arena.dtype))
    return arena
