"""The Triton kernel of the fused combine (semantics: fallback.py).

One memory-bound affine map for every draft and refine of a round: k output rows of a buffer from s input rows of
the same buffer. Each program owns one block of elements: it reads that block of every input once, accumulates all
k outputs in registers ([K, BLOCK], K = k rounded up to a power of two) and writes them with one masked 2-D store
after the last load, so outputs may alias inputs. Row offsets are int64 (buffers past 2^31 elements); row numbers
and coefficients stay on the device (no host sync).
"""
import os

import numpy as np
import torch
import triton
import triton.language as tl

from .fallback import accum_dtype

NUM_WARPS = 4


def _interpreter_index_fix():
    """Under TRITON_INTERPRET=1 only (the tests' CPU path): Triton before 3.7 turns a kernel's scalar argument used
    as a loop bound (`range(n_in)` below) into an int with int() of a one-element array, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"). Give the interpreter's tensors an __index__
    that reads their one element. Compiled kernels never run this; nothing changes where int() still converts."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter  # only under the interpreter: Triton's own (private) interpreter module
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "one_element_index", False):
        return

    def index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if getattr(data, "size", 0) == 1 else int(data)

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", index)
    patched.one_element_index = True
    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()


def block_size(k: int, n: int | None = None) -> int:
    """Elements per program for k outputs of n elements: about 64 accumulators per thread on a GPU; huge under
    the interpreter, where every program costs a Python-level launch (but never much more than n)."""
    size = 1 << 16 if os.environ.get("TRITON_INTERPRET", "0") == "1" else max(128, min(1024, 8192 // k))
    return size if n is None else min(size, max(16, triton.next_power_of_2(n)))


@triton.jit
def _combine_kernel(arena_ptr, out_rows_ptr, in_rows_ptr, coef_ptr, n, n_in, n_out,
                    K: tl.constexpr, BLOCK: tl.constexpr):
    """arena[out_rows[r]] = sum_s coef[r, s] * arena[in_rows[s]] on this program's block; accumulates in coef's dtype."""
    acc_ty = coef_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n  # the last block runs past the end; the interpreter does not catch that
    ks = tl.arange(0, K)
    kmask = ks < n_out
    acc = tl.zeros([K, BLOCK], dtype=acc_ty)
    for s in range(n_in):
        row = tl.load(in_rows_ptr + s).to(tl.int64)
        x = tl.load(arena_ptr + row * n + offs, mask=mask, other=0.0).to(acc_ty)
        c = tl.load(coef_ptr + ks * n_in + s, mask=kmask, other=0.0)
        acc += c[:, None] * x[None, :]
    rows = tl.load(out_rows_ptr + ks, mask=kmask, other=0).to(tl.int64)
    ptrs = arena_ptr + rows[:, None] * n + offs[None, :]
    tl.store(ptrs, acc.to(arena_ptr.dtype.element_ty), mask=kmask[:, None] & mask[None, :])


def combine(arena: torch.Tensor, out_rows: torch.Tensor, in_rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Launch the combine kernel on a contiguous arena [R, ...] with int64 row tensors and coef [k, s]."""
    n, k, s = arena[0].numel(), out_rows.numel(), in_rows.numel()
    if n == 0 or k == 0:
        return arena
    c = coef.to(device=arena.device, dtype=accum_dtype(arena.dtype)).contiguous()
    K = triton.next_power_of_2(k)
    block = block_size(K, n)
    _combine_kernel[(triton.cdiv(n, block),)](arena, out_rows, in_rows, c, n, s, k, K=K, BLOCK=block,
                                              num_warps=NUM_WARPS)
    return arena
