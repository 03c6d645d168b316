"""The floor of a round's communication: one all-gather (and one broadcast) of a latent between ranks that wake from
a model call, as the runtime's rounds do. Run under torchrun; rank 0 prints and writes JSON.

    torchrun --nproc_per_node=2 perf/bench_collectives.py --out perf/results/collectives.json

Each iteration sleeps --wake seconds (a model call that holds no core), then times one collective; the median over
--iters iterations is the per-round floor the runtime's overhead is compared with (bench_latency's overhead
column). gloo on CPU ranks, NCCL on GPUs.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from driffusion_rt.distributed import all_gather_rows, maybe_init_dist, teardown


def time_collectives(info, shape, wake: float, iters: int) -> dict:
    """Median and min milliseconds of one all-gather and one broadcast of a `shape` chunk, each after every rank
    sleeps `wake` seconds (a model call that holds no core)."""
    x = torch.randn(shape, device=info.device)
    gathered = torch.empty(info.world * shape[0], *shape[1:], device=info.device)
    times = {"all_gather": [], "broadcast": []}
    for _ in range(iters):
        for name in times:
            time.sleep(wake)
            t0 = time.perf_counter()
            if name == "all_gather":
                all_gather_rows(gathered, x, info)
            else:
                dist.broadcast(x, 0, group=info.group)
            if x.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1x4x64x64", help="latent shape of one rank's chunk (B x C x H x W)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--wake", type=float, default=0.04, help="seconds each rank sleeps before a collective")
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    args = p.parse_args(argv)
    info = maybe_init_dist(timeout_s=120)
    shape = tuple(int(v) for v in args.shape.split("x"))
    row = time_collectives(info, shape, args.wake, args.iters)
    row.update(world=info.world, backend=info.backend, shape=args.shape, wake_s=args.wake, iters=args.iters)
    if info.rank == 0:
        print(json.dumps(row, indent=2))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(row, f, indent=2)
    teardown(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
