#!/usr/bin/env python
"""Benchmark the fused draft/refine kernels against the torch fallback and a naive unfused torch expression.

On a GPU every implementation is timed inside a CUDA graph (--graph-launches launches per replay, CUDA events
around each replay), so Python launch overhead is not measured; the default sizes include one well above L2
(256x4x128x128), and every case is compared with a device-to-device copy of the same number of bytes measured in
the same run (copy_pct: the implementation's GB/s as a percentage of the copy's). On a CPU only the torch paths
are timed: Triton would run in its interpreter there, whose timings are not performance numbers.

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
GPU_SIZES = SIZES + ["256x4x128x128"]  # 32 MiB per fp16 row: a round's rows are several times any GPU's L2
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BYTES_DOC = ("bytes moved: draft = (k + 2) * numel * itemsize (2 inputs read, k drafts written); "
             "refine = (m + 2) * numel * itemsize (m stack rows + 1 noise row read, 1 output written); "
             "coefficients not counted")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=None, metavar="SHAPE",
                   help=f"latent shapes such as 4x128x128 or 2x4x128x128 (default: {' '.join(SIZES)}; on a GPU "
                        f"also 256x4x128x128, out of L2)")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 4, 8], metavar="K",
                   help="draft counts, outputs of one draft call (default: 1 2 4 8)")
    p.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8], metavar="M",
                   help="refine stack depths, rows summed (default: 1 2 4 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="data dtype (default float16 on GPU, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case, median reported (default 100 on GPU, 20 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 on GPU, 2 on CPU)")
    p.add_argument("--graph-launches", type=int, default=20,
                   help="GPU: launches captured in one CUDA graph; --repeats replays are timed (default 20)")
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


def time_ms(fn, warmup: int, repeats: int, cuda: bool, launches: int = 1) -> float:
    """Median time of one call in ms. GPU: `launches` calls captured in one CUDA graph, CUDA events around each of
    `repeats` replays (no Python launch overhead). CPU: perf_counter around each call."""
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    side = torch.cuda.Stream()  # warm up on a side stream before capture, as the CUDA-graph docs require
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / launches for s, e in events]
    del graph
    return statistics.median(times)


def copy_case(nbytes: int, device):
    """A device-to-device copy moving `nbytes` (half read, half written): the bandwidth reference."""
    n = max(1, nbytes // 2)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


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


def l2_bytes(device) -> int:
    """The GPU's L2 cache size (0 if torch does not report it)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def measure(sizes, ks, ms, dtype, device, impl_names, warmup, repeats, launches=20) -> list:
    """One row per (op, size, k or m): time and GB/s of each implementation and of a copy of the same bytes."""
    cuda = device.type == "cuda"
    l2 = l2_bytes(device) if cuda else 0
    base = "fused" if "fused" in impl_names else "fallback"
    rows = []
    for op, counts, make in (("draft", ks, draft_cases), ("refine", ms, refine_cases)):
        for shape in sizes:
            for c in counts:
                impls, nbytes = make(shape, c, dtype, device)
                if "fused" in impl_names:
                    check(impls, dtype)
                row = {"op": op, "size": "x".join(map(str, shape)), "numel": math.prod(shape),
                       "k_or_m": c, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes}
                if l2:
                    row["in_l2"] = nbytes <= l2
                impls["copy"] = copy_case(nbytes, device)
                for name in impl_names + ["copy"]:
                    t = time_ms(impls[name], warmup, repeats, cuda, launches)
                    row[f"{name}_ms"] = t
                    row[f"{name}_GBps"] = nbytes / (t * 1e-3) / 1e9
                for name in impl_names:
                    row[f"{name}_copy_pct"] = 100 * row[f"{name}_GBps"] / row["copy_GBps"]
                row[f"speedup_{base}_vs_unfused"] = row["unfused_ms"] / row[f"{base}_ms"]
                rows.append(row)
                del impls
                if cuda:
                    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.graph_launches < 1:
        raise SystemExit(f"--graph-launches must be >= 1, got {args.graph_launches}")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("float16" if cuda else "float32")]
    repeats = args.repeats or (100 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    sizes = [parse_size(s) for s in (args.sizes or (GPU_SIZES if cuda else SIZES))]
    impl_names = ["fused", "fallback", "unfused"]
    if not cuda or os.environ.get("TRITON_INTERPRET") == "1":
        impl_names = ["fallback", "unfused"]
        print("NOTE: no CUDA device (or TRITON_INTERPRET=1): the Triton kernels would run in the interpreter, whose\n"
              "timings are NOT performance numbers. Timing only the torch fallback and the unfused torch expression\n"
              f"on {'CPU' if not cuda else 'GPU'}; run on a GPU for fused-kernel numbers.\n")
    base = "fused" if "fused" in impl_names else "fallback"
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    rows = measure(sizes, args.k, args.m, dtype, device, impl_names, warmup, repeats, args.graph_launches)

    header = ["op", "size", "k|m"] + [f"{n} ms" for n in impl_names] + ["copy ms"] \
        + [f"{n} GB/s" for n in impl_names] + ["copy GB/s"] + [f"{n} % of copy" for n in impl_names] \
        + [f"{base} speedup vs unfused"] + (["in L2"] if cuda else [])
    table = [[r["op"], r["size"], str(r["k_or_m"])] + [f"{r[f'{n}_ms']:.4f}" for n in impl_names + ["copy"]]
             + [f"{r[f'{n}_GBps']:.1f}" for n in impl_names + ["copy"]]
             + [f"{r[f'{n}_copy_pct']:.0f}%" for n in impl_names] + [f"{r[f'speedup_{base}_vs_unfused']:.2f}x"]
             + (["yes" if r.get("in_l2") else "no"] if cuda else [])
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    timer = (f"median of {repeats} CUDA-graph replays of {args.graph_launches} launches each (CUDA events)" if cuda
             else f"median of {repeats} calls (perf_counter)")
    print(f"device: {device_name} ({device.type}), dtype {str(dtype).replace('torch.', '')}, {timer} after {warmup} "
          f"warmup, torch threads {torch.get_num_threads()}"
          + (f", L2 {l2_bytes(device) / 2**20:.0f} MiB" if cuda else ""))
    print(f"GB/s = {BYTES_DOC} / median time; copy = a device-to-device copy of the same bytes (half read, half "
          f"written) in the same run")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths)))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_kernels_{device.type}_{str(dtype).replace('torch.', '')}"
    meta = {"device": device.type, "device_name": device_name, "dtype": str(dtype), "repeats": repeats,
            "warmup": warmup, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "timer": "cuda graph replays, cuda events" if cuda else "perf_counter", "bytes_formula": BYTES_DOC,
            "graph_launches": args.graph_launches if cuda else None, "l2_bytes": l2_bytes(device) if cuda else None,
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
