"""Triton kernels for the fused draft and refine updates (semantics: fallback.py).

Both are memory-bound affine maps, so each kernel reads every input element once and writes every output
element once. Tensors are treated as flat arrays; coefficients stay on the device (no host sync).
"""
import os

import torch
import triton
import triton.language as tl

from .fallback import accum_dtype

NUM_WARPS = 4


def block_size() -> int:
    """Elements per program: small enough to spread SD-sized latents over many SMs; huge under the
    interpreter, where every program costs a Python-level launch."""
    return 1 << 16 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024


@triton.jit
def _draft_kernel(out_ptr, x0_ptr, x1_ptr, x2_ptr, x3_ptr, coef_ptr, n, k,
                  N_IN: tl.constexpr, BLOCK: tl.constexpr):
    """out[r] = sum_s coef[r, s] * x_s for r < k; the accumulation dtype is coef's dtype."""
    acc_ty = coef_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n  # the last block runs past the end; the interpreter does not catch that
    x0 = tl.load(x0_ptr + offs, mask=mask).to(acc_ty)
    if N_IN > 1:
        x1 = tl.load(x1_ptr + offs, mask=mask).to(acc_ty)
    if N_IN > 2:
        x2 = tl.load(x2_ptr + offs, mask=mask).to(acc_ty)
    if N_IN > 3:
        x3 = tl.load(x3_ptr + offs, mask=mask).to(acc_ty)
    o_ptrs = out_ptr + offs
    for r in range(k):
        y = tl.load(coef_ptr + r * N_IN) * x0
        if N_IN > 1:
            y += tl.load(coef_ptr + r * N_IN + 1) * x1
        if N_IN > 2:
            y += tl.load(coef_ptr + r * N_IN + 2) * x2
        if N_IN > 3:
            y += tl.load(coef_ptr + r * N_IN + 3) * x3
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        o_ptrs += n  # advance the pointer rather than computing r * n, which can overflow int32


@triton.jit
def _refine_kernel(out_ptr, stack_ptr, w_ptr, noise_ptr, wz_ptr, n, m, q, BLOCK: tl.constexpr):
    """out = sum_r w[r] * stack[r] + sum_j wz[j] * noise[j]; the accumulation dtype is w's dtype."""
    acc_ty = w_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    s_ptrs = stack_ptr + offs
    for r in range(m):
        acc += tl.load(w_ptr + r) * tl.load(s_ptrs, mask=mask).to(acc_ty)
        s_ptrs += n
    z_ptrs = noise_ptr + offs
    for j in range(q):
        acc += tl.load(wz_ptr + j) * tl.load(z_ptrs, mask=mask).to(acc_ty)
        z_ptrs += n
    # Single store after all loads: `out` may alias stack[0], and each program reads only its own block.
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _coef(c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Coefficients as a contiguous device tensor in the accumulation dtype (a no-op when already so)."""
    return c.to(device=out.device, dtype=accum_dtype(out.dtype)).contiguous()


def draft(out: torch.Tensor, inputs, coef: torch.Tensor) -> torch.Tensor:
    """Launch the draft kernel: out [k, *shape] from 1..4 contiguous inputs and coef [k, len(inputs)]."""
    n, k = out[0].numel(), out.shape[0]
    if n == 0:
        return out
    xs = list(inputs) + [inputs[0]] * (4 - len(inputs))  # unused pointer slots, never read
    block = block_size()
    _draft_kernel[(triton.cdiv(n, block),)](out, *xs, _coef(coef, out), n, k,
                                            N_IN=len(inputs), BLOCK=block, num_warps=NUM_WARPS)
    return out


def refine(out: torch.Tensor, stack: torch.Tensor, weights: torch.Tensor,
           noise: torch.Tensor | None = None, noise_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the refine kernel: out [*shape] (may alias stack[0]) from stack [m, *shape] and optional noise."""
    n = out.numel()
    if n == 0:
        return out
    w = _coef(weights, out)
    if noise is None:
        noise, wz, q = stack, w, 0  # unused pointer slots, never read (q = 0)
    else:
        wz, q = _coef(noise_weights, out), noise.shape[0]
    block = block_size()
    _refine_kernel[(triton.cdiv(n, block),)](out, stack, w, noise, wz, n, stack.shape[0], q,
                                             BLOCK=block, num_warps=NUM_WARPS)
    return out
