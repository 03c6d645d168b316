#!/usr/bin/env python
"""Benchmark the fused draft/refine kernels against the torch fallback and a naive unfused torch expression.

On a GPU the Triton kernels are timed with CUDA events. On a CPU only the torch paths are timed: Triton
would run in its interpreter there, whose timings are not performance numbers.

    python perf/bench_kernels.py                       # default SD/SDXL latent sizes, k and m in 1 2 4 8
    python perf/bench_kernels.py --sizes 2x4x128x128 --k 4 --m 4 --dtype bfloat16 --out /tmp/bench
"""
import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from driffusion_rt import kernels

SIZES = ["1x4x64x64", "2x4x64x64", "2x4x128x128", "8x4x128x128"]  # SD1.5 512px, + CFG, SDXL 1024px + CFG, batch 4
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BYTES_DOC = ("bytes moved: draft = (k + 2) * numel * itemsize (2 inputs read, k drafts written); "
             "refine = (m + 2) * numel * itemsize (m stack rows + 1 noise row read, 1 output written); "
             "coefficients not counted")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=None, metavar="SHAPE",
                   help=f"latent shapes such as 4x128x128 or 2x4x128x128 (default: {' '.join(SIZES)})")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 4, 8], metavar="K",
                   help="draft counts, outputs of one draft call (default: 1 2 4 8)")
    p.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8], metavar="M",
                   help="refine stack depths, rows summed (default: 1 2 4 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="data dtype (default float16 on GPU, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case, median reported (default 100 on GPU, 20 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 on GPU, 2 on CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto (default): cuda if available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: several threads on shared cores stall for whole "
                        "scheduler slices and make timings erratic; torch's default on GPU)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="directory for bench_kernels_<device>_<dtype>.json/.csv, created if missing "
                        "(default: perf/results)")
    return p.parse_args(argv)


def parse_size(text: str) -> tuple:
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise SystemExit(f"bad --sizes entry {text!r}: expected positive integers joined by 'x', e.g. 4x128x128")
    return shape


def time_ms(fn, warmup: int, repeats: int, cuda: bool) -> float:
    """Median wall time of one call in ms (CUDA events per call on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rows(r, device):
    return torch.tensor(list(r), dtype=torch.long, device=device)


def draft_cases(shape, k, dtype, device):
    """Callables for one draft case: 2 inputs (x_t and the model output), k drafts, as one combine call."""
    arena = torch.randn(2 + k, *shape, device=device).to(dtype)
    coef = torch.randn(k, 2, device=device)
    out, inp = _rows(range(2, 2 + k), device), _rows(range(2), device)
    x, eps = arena[0], arena[1]

    def fused():
        with kernels.backend("triton"):
            return kernels.combine(arena, out, inp, coef)[2:]

    def fallback():
        with kernels.backend("torch"):
            return kernels.combine(arena, out, inp, coef)[2:]

    def unfused():  # what a straightforward implementation writes
        return torch.stack([coef[r, 0] * x + coef[r, 1] * eps for r in range(k)])

    return {"fused": fused, "fallback": fallback, "unfused": unfused}, (k + 2) * x.numel() * x.element_size()


def refine_cases(shape, m, dtype, device):
    """Callables for one refine case: m stack rows and 1 noise row into a fresh output row, as one combine call."""
    arena = torch.randn(m + 2, *shape, device=device).to(dtype)
    w = torch.randn(1, m + 1, device=device)
    out_row, inp = _rows([m + 1], device), _rows(range(m + 1), device)
    stack, noise = arena[:m], arena[m]

    def fused():
        with kernels.backend("triton"):
            return kernels.combine(arena, out_row, inp, w)[m + 1]

    def fallback():
        with kernels.backend("torch"):
            return kernels.combine(arena, out_row, inp, w)[m + 1]

    def unfused():
        return sum(w[0, r] * stack[r] for r in range(m)) + w[0, m] * noise

    return {"fused": fused, "fallback": fallback, "unfused": unfused}, (m + 2) * noise.numel() * noise.element_size()


def check(impls, dtype):
    """The fused kernel agrees with the fallback before it is timed (GPU only)."""
    got, want = impls["fused"]().clone(), impls["fallback"]().clone()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("float16" if cuda else "float32")]
    repeats = args.repeats or (100 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    sizes = [parse_size(s) for s in (args.sizes or SIZES)]
    impl_names = ["fused", "fallback", "unfused"]
    if not cuda or os.environ.get("TRITON_INTERPRET") == "1":
        impl_names = ["fallback", "unfused"]
        print("NOTE: no CUDA device (or TRITON_INTERPRET=1): the Triton kernels would run in the interpreter, whose\n"
              "timings are NOT performance numbers. Timing only the torch fallback and the unfused torch expression\n"
              f"on {'CPU' if not cuda else 'GPU'}; run on a GPU for fused-kernel numbers.\n")
    base = "fused" if "fused" in impl_names else "fallback"
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())

    rows = []
    for op, counts, make in (("draft", args.k, draft_cases), ("refine", args.m, refine_cases)):
        for shape in sizes:
            for c in counts:
                impls, nbytes = make(shape, c, dtype, device)
                if "fused" in impl_names:
                    check(impls, dtype)
                row = {"op": op, "size": "x".join(map(str, shape)), "numel": math.prod(shape),
                       "k_or_m": c, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes}
                for name in impl_names:
                    ms = time_ms(impls[name], warmup, repeats, cuda)
                    row[f"{name}_ms"] = ms
                    row[f"{name}_GBps"] = nbytes / (ms * 1e-3) / 1e9
                row[f"speedup_{base}_vs_unfused"] = row["unfused_ms"] / row[f"{base}_ms"]
                rows.append(row)
                del impls

    header = ["op", "size", "k|m"] + [f"{n} ms" for n in impl_names] + [f"{n} GB/s" for n in impl_names] \
        + [f"{base} speedup vs unfused"]
    table = [[r["op"], r["size"], str(r["k_or_m"])] + [f"{r[f'{n}_ms']:.4f}" for n in impl_names]
             + [f"{r[f'{n}_GBps']:.1f}" for n in impl_names] + [f"{r[f'speedup_{base}_vs_unfused']:.2f}x"]
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print(f"device: {device_name} ({device.type}), dtype {str(dtype).replace('torch.', '')}, "
          f"median of {repeats} calls after {warmup} warmup, torch threads {torch.get_num_threads()}")
    print(f"GB/s = {BYTES_DOC} / median time")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_kernels_{device.type}_{str(dtype).replace('torch.', '')}"
    meta = {"device": device.type, "device_name": device_name, "dtype": str(dtype), "repeats": repeats,
            "warmup": warmup, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "timer": "cuda events" if cuda else "perf_counter", "bytes_formula": BYTES_DOC,
            "fused_timed": "fused" in impl_names, "created": datetime.datetime.now().isoformat(timespec="seconds")}
    if "fused" in impl_names:
        import triton
        meta["triton"] = triton.__version__
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
