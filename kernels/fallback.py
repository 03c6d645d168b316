"""Plain-torch draft and refine updates: the reference semantics of the fused kernels, and the CPU path."""
import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half/bfloat16/float32 data accumulate in float32; float64 data in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def draft(out: torch.Tensor, inputs, coef: torch.Tensor) -> torch.Tensor:
    """out[r] = sum_s coef[r, s] * inputs[s], accumulated in float32 (float64 for float64 data)."""
    acc = accum_dtype(out.dtype)
    x = torch.stack([t.reshape(-1) for t in inputs]).to(acc)
    out.view(out.shape[0], -1).copy_(coef.to(acc) @ x)
    return out


def refine(out, stack, weights, noise=None, noise_weights=None) -> torch.Tensor:
    """out = sum_r weights[r] * stack[r] (+ sum_q noise_weights[q] * noise[q]); out may alias stack[0]."""
    acc = accum_dtype(out.dtype)
    y = weights.to(acc) @ stack.reshape(stack.shape[0], -1).to(acc)
    if noise is not None:
        y = y + noise_weights.to(acc) @ noise.reshape(noise.shape[0], -1).to(acc)
    out.view(-1).copy_(y)
    return out
