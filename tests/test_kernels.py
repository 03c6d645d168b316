"""Fused draft/refine kernels (run by the Triton interpreter on CPU) against the torch fallback and a
float64 reference, plus the dispatcher's backend choice and its contiguity handling."""
import pytest
import torch

from driffusion_rt import kernels
from driffusion_rt.kernels import fallback, fused

SMALL = (3, 33, 17)  # odd sizes, far below one block
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _ragged():
    """A flat size that spills 7 elements into a second, masked block."""
    return (fused.block_size() + 7,)


def _randn(*shape, dtype=F32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _coef(*shape, dtype, device, seed):
    return _randn(*shape, dtype=fallback.accum_dtype(dtype), device=device, seed=seed)


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


def _draft_ref(inputs, coef):
    x = torch.stack([t.reshape(-1).double() for t in inputs])
    c = coef.double()
    return c @ x, c.abs() @ x.abs()


def _refine_ref(stack, w, noise, wz):
    x, c = stack.reshape(stack.shape[0], -1).double(), w.double()
    if noise is not None:
        x = torch.cat([x, noise.reshape(noise.shape[0], -1).double()])
        c = torch.cat([c, wz.double()])
    return c @ x, c.abs() @ x.abs()


def _check_draft(k, n_in, shape, dtype, device):
    inputs = [_randn(*shape, dtype=dtype, device=device, seed=s) for s in range(n_in)]
    coef = _coef(k, n_in, dtype=dtype, device=device, seed=10 + k)
    ref, scale = _draft_ref(inputs, coef)
    got = fused.draft(torch.full((k, *shape), float("nan"), dtype=dtype, device=device), inputs, coef)
    want = fallback.draft(torch.empty(k, *shape, dtype=dtype, device=device), inputs, coef)
    for out, name in ((got, "fused"), (want, "fallback")):
        _assert_close(out.reshape(k, -1), ref, scale, f"draft {name}")


def _check_refine(m, q, shape, dtype, device, alias=False):
    stack = _randn(m, *shape, dtype=dtype, device=device, seed=1)
    noise = _randn(q, *shape, dtype=dtype, device=device, seed=2) if q else None
    w = _coef(m, dtype=dtype, device=device, seed=20 + m)
    wz = _coef(q, dtype=dtype, device=device, seed=30 + q) if q else None
    ref, scale = _refine_ref(stack, w, noise, wz)
    want = fallback.refine(torch.empty(shape, dtype=dtype, device=device), stack, w, noise, wz)
    before = stack.clone()
    out = stack[0] if alias else torch.full(shape, float("nan"), dtype=dtype, device=device)
    got = fused.refine(out, stack, w, noise, wz)
    assert got.data_ptr() == out.data_ptr()
    for res, name in ((got, "fused"), (want, "fallback")):
        _assert_close(res.reshape(-1), ref, scale, f"refine {name}")
    if alias:
        assert torch.equal(stack[0], got) and torch.equal(stack[1:], before[1:])


@pytest.mark.parametrize("n_in", [1, 2, 3, 4])
@pytest.mark.parametrize("k", range(1, 9))
def test_draft_float32(k, n_in, device):
    _check_draft(k, n_in, SMALL, F32, device)


@pytest.mark.parametrize("q", [0, 1, 2])
@pytest.mark.parametrize("m", range(1, 9))
def test_refine_float32(m, q, device):
    _check_refine(m, q, SMALL, F32, device)


@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=["f16", "bf16", "f64"])
@pytest.mark.parametrize("k,n_in", [(1, 1), (3, 2), (8, 3), (5, 4)])
def test_draft_other_dtypes_ragged(k, n_in, dtype, device):
    _check_draft(k, n_in, _ragged(), dtype, device)


@pytest.mark.parametrize("dtype", [F16, BF16, F64], ids=["f16", "bf16", "f64"])
@pytest.mark.parametrize("m,q", [(1, 0), (3, 1), (8, 2)])
def test_refine_other_dtypes_ragged(m, q, dtype, device):
    _check_refine(m, q, _ragged(), dtype, device)


@pytest.mark.parametrize("shape", [(1,), _ragged(), (2, fused.block_size() // 2)], ids=["one", "ragged", "one-block"])
def test_block_boundaries_float32(shape, device):
    _check_draft(4, 2, shape, F32, device)
    _check_refine(4, 1, shape, F32, device)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("m,q", [(1, 1), (4, 0), (4, 2)])
def test_refine_into_stack_row(m, q, dtype, device):
    _check_refine(m, q, _ragged(), dtype, device, alias=True)


def test_draft_writes_only_its_rows(device):
    """Masking: the ragged tail of every row is written, nothing past the last row is touched."""
    k, n = 3, fused.block_size() + 7
    buf = torch.full((k + 1, n), 7.0, device=device)
    x = _randn(n, device=device)
    fused.draft(buf[:k], [x], torch.ones(k, 1, device=device))
    assert torch.equal(buf[:k], x.expand(k, n)) and (buf[k] == 7.0).all()


@pytest.fixture
def spy(monkeypatch):
    """Count calls into the fused launchers while still running them."""
    calls = []

    def wrap(name, real):
        def counted(*args):
            calls.append(name)
            return real(*args)
        return counted

    for name in ("draft", "refine"):
        monkeypatch.setattr(fused, name, wrap(name, getattr(fused, name)))
    return calls


@pytest.mark.parametrize("name", ["auto", "torch"])
def test_public_api_noncontiguous_inputs(name, device, spy):
    x = _randn(66, 17, device=device)[::2]  # strided rows
    y = _randn(17, 33, device=device, seed=1).t()  # transposed
    assert not x.is_contiguous() and not y.is_contiguous()
    coef = _coef(5, 2, dtype=F32, device=device, seed=3)
    stack = _randn(33, 17, 4, device=device).movedim(-1, 0)
    noise = _randn(17, 33, 1, device=device, seed=4).permute(2, 1, 0)
    w, wz = _coef(4, dtype=F32, device=device, seed=5), _coef(1, dtype=F32, device=device, seed=6)
    with kernels.backend(name):
        d = kernels.draft(torch.empty(5, 33, 17, device=device), [x, y], coef)
        r = kernels.refine(torch.empty(33, 17, device=device), stack, w, noise, wz)
    _assert_close(d.reshape(5, -1), *_draft_ref([x, y], coef), "draft")
    _assert_close(r.reshape(-1), *_refine_ref(stack, w, noise, wz), "refine")
    assert spy == ([] if name == "torch" else ["draft", "refine"])


def test_public_api_noncontiguous_out_raises(device):
    x, coef = _randn(33, 17, device=device), torch.ones(2, 1, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.draft(torch.empty(33, 17, 2, device=device).movedim(-1, 0), [x], coef)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.refine(torch.empty(17, 33, device=device).t(), x[None], torch.ones(1, device=device))


@pytest.fixture
def fused_forbidden(monkeypatch):
    def boom(*a):
        raise AssertionError("fused kernel called")
    monkeypatch.setattr(fused, "draft", boom)
    monkeypatch.setattr(fused, "refine", boom)


def _public_calls(device):
    x, coef = _randn(33, 17, device=device), _coef(2, 1, dtype=F32, device=device, seed=7)
    w = torch.ones(1, device=device)
    d = kernels.draft(torch.empty(2, 33, 17, device=device), [x], coef)
    r = kernels.refine(torch.empty(33, 17, device=device), x[None], w * 0.5)
    torch.testing.assert_close(d, coef[:, :, None] * x, rtol=1e-6, atol=0)
    torch.testing.assert_close(r, 0.5 * x, rtol=0, atol=0)


def test_torch_backend_never_calls_fused(device, fused_forbidden):
    with kernels.backend("torch"):
        _public_calls(device)


def test_auto_backend_uses_torch_for_cpu_without_interpreter(monkeypatch, fused_forbidden):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.backend("auto"):
        _public_calls(torch.device("cpu"))


@pytest.mark.parametrize("name", ["auto", "triton"])
def test_triton_backend_calls_fused(name, device, spy):
    with kernels.backend(name):
        _public_calls(device)
    assert spy == ["draft", "refine"]


def test_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="cuda"):
        with kernels.backend("cuda"):
            pass
