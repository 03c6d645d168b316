"""The fused combine kernel (run by the Triton interpreter on CPU) against the torch fallback and a float64
reference, plus the dispatcher's backend choice and its checks."""
import pytest
import torch

from driffusion_rt import kernels
from driffusion_rt.kernels import fallback, fused

SMALL = (3, 33, 17)  # odd sizes, far below one block
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _ragged(k=4):
    """A flat size that spills 7 elements into a second, masked block."""
    return (fused.block_size(k) + 7,)


def _randn(*shape, dtype=F32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two 16-bit float tensors (sign-magnitude -> ordinal)."""
    def ordinal(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordinal(a) - ordinal(b)).abs()


def _assert_close(got, ref64, scale, what):
    """got within the dtype's tolerance of the float64 reference; scale = sum |coef * input| per element."""
    if got.dtype in (F32, F64):
        rtol = 1e-6 if got.dtype == F32 else 1e-12
        err = (got.double() - ref64).abs()
        assert (err <= rtol * scale).all(), f"{what}: max error {err.max():.3g} exceeds {rtol:g} * sum|c x|"
    else:
        # Half/bfloat16 results are float32 sums rounded once. Where terms cancel, the float32 error alone
        # (<= 1e-6 * sum|c x|) can exceed a half ulp of the tiny result, so measure ulps from the nearest
        # point of that float32 error interval around the reference (elsewhere the interval is << 1 ulp).
        max_ulps = 1 if got.dtype == F16 else 2  # the interpreter rounds bfloat16 by truncation
        tol = 1e-6 * scale
        nearest = torch.minimum(torch.maximum(got.double(), ref64 - tol), ref64 + tol)
        ulps = _ulps(got, nearest.to(got.dtype))
        assert ulps.max() <= max_ulps, f"{what}: {ulps.max()} ulps from the rounded float64 reference"


def _case(rows, out, inp, shape, dtype, device, seed=0):
    arena = _randn(rows, *shape, dtype=dtype, device=device, seed=seed)
    coef = _randn(len(out), len(inp), dtype=fallback.accum_dtype(dtype), device=device, seed=seed + 1)
    x = arena.reshape(rows, -1).double()[inp]
    ref, scale = coef.double() @ x, coef.double().abs() @ x.abs()
    rows_t = lambda r: torch.tensor(r, dtype=torch.long, device=device)  # noqa: E731
    return arena, rows_t(out), rows_t(inp), coef, ref, scale


def _check(rows, out, inp, shape, dtype, device):
    """Both backends write exactly the output rows with the reference values and leave every other row alone."""
    arena, o, i, coef, ref, scale = _case(rows, out, inp, shape, dtype, device)
    for impl, name in ((fused.combine, "fused"), (fallback.combine, "fallback")):
        a = arena.clone()
        assert impl(a, o, i, coef) is a
        _assert_close(a.reshape(rows, -1)[out], ref, scale, f"combine {name}")
        others = [r for r in range(rows) if r not in out]
        assert torch.equal(a[others], arena[others]), f"{name} wrote a row it was not given"


@pytest.mark.parametrize("n_in", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9])
def test_combine_float32(k, n_in, device):
    rows = k + n_in + 1
    _check(rows, list(range(k)), list(range(k, k + n_in)), SMALL, F32, device)


@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=["f16", "bf16", "f64"])
@pytest.mark.parametrize("k,n_in", [(1, 1), (3, 2), (8, 3), (5, 9)])
def test_combine_other_dtypes_ragged(k, n_in, dtype, device):
    _check(k + n_in, list(range(n_in, n_in + k)), list(range(n_in)), _ragged(k), dtype, device)


@pytest.mark.parametrize("shape", [(1,), _ragged(), (2, fused.block_size(4) // 2)], ids=["one", "ragged", "one-block"])
def test_block_boundaries_float32(shape, device):
    _check(9, [0, 3, 5, 8], [1, 2, 4], shape, F32, device)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_outputs_may_overwrite_inputs(dtype, device):
    """A refine writes the next state over rows it reads: every input is read before any output is written."""
    _check(6, [0, 4, 1], [0, 1, 2, 3, 4], _ragged(), dtype, device)


def test_scattered_rows_and_order(device):
    """Rows are read and written where the tables say, in any order, repeated inputs included."""
    _check(12, [11, 2, 7], [9, 0, 9, 5, 3], SMALL, F32, device)


@pytest.fixture
def spy(monkeypatch):
    """Count calls into the fused launcher while still running it."""
    calls = []
    real = fused.combine

    def counted(*args):
        calls.append("combine")
        return real(*args)

    monkeypatch.setattr(fused, "combine", counted)
    return calls


def _public_call(device):
    arena = _randn(4, 33, 17, device=device)
    expect = 0.5 * arena[1] - 2.0 * arena[2]
    o, i = (torch.tensor(r, dtype=torch.long, device=device) for r in ([3], [1, 2]))
    kernels.combine(arena, o, i, torch.tensor([[0.5, -2.0]], device=device))
    torch.testing.assert_close(arena[3], expect, rtol=1e-6, atol=1e-6)


def test_torch_backend_never_calls_fused(device, spy):
    with kernels.backend("torch"):
        _public_call(device)
    assert spy == []


def test_auto_backend_uses_torch_for_cpu_without_interpreter(monkeypatch, spy):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.backend("auto"):
        _public_call(torch.device("cpu"))
    assert spy == []


@pytest.mark.parametrize("name", ["auto", "triton"])
def test_triton_backend_calls_fused(name, device, spy):
    with kernels.backend(name):
        _public_call(device)
    assert spy == ["combine"]


def test_public_api_rejects_bad_arguments(device):
    arena = torch.zeros(4, 5, device=device)
    rows = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.combine(torch.zeros(5, 4, device=device).t(), rows, rows, torch.ones(2, 2, device=device))
    with pytest.raises(ValueError, match=r"coef \(2, 3\) does not match 2 outputs x 2 inputs"):
        kernels.combine(arena, rows, rows, torch.ones(2, 3, device=device))
    with pytest.raises(ValueError, match="int64"):
        kernels.combine(arena, rows.int(), rows, torch.ones(2, 2, device=device))


def test_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="cuda"):
        with kernels.backend("cuda"):
            pass


AOT_COMPILE = """
import sys
from driffusion_rt.kernels import fused
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("NO_AOT", e)
    sys.exit(0)
sizes = []
for arena, coef in (("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
    sig = {"arena_ptr": "*" + arena, "out_rows_ptr": "*i64", "in_rows_ptr": "*i64", "coef_ptr": "*" + coef,
           "n": "i64", "n_in": "i32", "n_out": "i32", "K": "constexpr", "BLOCK": "constexpr"}
    src = ASTSource(fused._combine_kernel, sig, constexprs={"K": 4, "BLOCK": fused.block_size(4)})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": fused.NUM_WARPS})
    sizes.append(len(kernel.asm["cubin"]))
print("TRITON", triton.__version__)
print("CUBIN_BYTES", *sizes)
"""


def test_the_kernel_compiles_for_an_h100_without_a_gpu():
    """The interpreter (every other test here) never runs Triton's compiler: compile the combine kernel ahead of time
    for sm_90 (H100 / H200) in each dtype, PTX and cubin, with the installed Triton. No GPU is needed; a Triton
    release whose language or compiler changed under the kernel fails here, not on the device."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_COMPILE], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    if "NO_AOT" in r.stdout:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {r.stdout.strip()}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("CUBIN_BYTES"))
    sizes = [int(v) for v in line.split()[1:]]
    assert len(sizes) == 4 and all(s > 1000 for s in sizes), r.stdout
